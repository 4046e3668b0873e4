"""The MNC meta-architecture: backbone -> proposal generator (stage 1) -> MNCROIHeads (stages 2-5),
plus MNC's image-space post-processing (masks binarised at 0.4 in the box they were predicted in,
optional mask voting). Training is D2's GeneralizedRCNN.forward: the total loss is the sum of all
stage losses, and since later stages consume earlier outputs, their gradients flow back through them.
"""
from typing import Dict, List, Optional

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Instances

from ..utils.errors import ConfigError
from .postprocessing import mnc_postprocess


@META_ARCH_REGISTRY.register()
class MNC(GeneralizedRCNN):
    @configurable
    def __init__(self, *, mask_threshold: float = 0.4, mask_voting: bool = True, voting_iou: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.mask_threshold = mask_threshold
        self.mask_voting = mask_voting
        self.voting_iou = voting_iou

    @classmethod
    def from_config(cls, cfg):
        if not cfg.MODEL.MASK_ON:
            raise ConfigError("MODEL.MASK_ON must be True for MNC, which trains masks in stage 2 (D2's Faster R-CNN "
                              "configs set False; without it the data loader drops the masks)")
        ret = super().from_config(cfg)
        test = cfg.MODEL.MNC.TEST
        ret.update(mask_threshold=test.MASK_THRESHOLD, mask_voting=test.MASK_VOTING, voting_iou=test.VOTING_IOU)
        return ret

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]],
                  detected_instances: Optional[List[Instances]] = None, do_postprocess: bool = True):
        """Same as GeneralizedRCNN.inference; with ``do_postprocess=False`` it returns the raw candidates
        of :class:`MNCROIHeads` (fields ``mask_boxes``, ``kept_rank`` and soft ``pred_masks``)."""
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if detected_instances is None:
            if self.proposal_generator is not None:
                proposals, _ = self.proposal_generator(images, features, None)
            else:
                proposals = [x["proposals"].to(self.device) for x in batched_inputs]
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            detected_instances = [x.to(self.device) for x in detected_instances]
            results = self.roi_heads.forward_with_given_boxes(features, detected_instances)
        if not do_postprocess:
            return results
        processed = []
        for candidates, inputs, image_size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            voting = self.mask_voting and detected_instances is None
            processed.append({"instances": mnc_postprocess(candidates, height, width, self.mask_threshold,
                                                           voting, self.voting_iou)})
        return processed
