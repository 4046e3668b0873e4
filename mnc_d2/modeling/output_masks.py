"""MNC's output mask branch: the head that predicts the masks MNC outputs, on boxes, as D2's
``StandardROIHeads._forward_mask`` does for Mask R-CNN. :class:`MNCROIHeads` runs the cascade (stages 2-5) and
calls this for:

* the final mask head's loss on stage 2's foreground RoIs (``loss_mask_final``; MNC's default, D2's
  ``MODEL.ROI_MASK_HEAD`` with its own RoIAlign: ``MODEL.MNC.FINAL_MASK_HEAD``);
* the output head's loss on the boxes as stage 3 regressed them (``loss_mask_refined``,
  ``MODEL.MNC.REFINED_MASK_LOSS``): the frame in which it predicts at test time;
* at test time, the kept detections' masks predicted once more on their final boxes
  (``MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES``), and ``forward_with_given_boxes``.

The output head is the final mask head when there is one, else the cascade's stage-2 head (the authors' output
path). A mixin of :class:`~mnc_d2.modeling.roi_heads.MNCROIHeads`, so that the heads keep their state-dict names
(``roi_heads.final_mask_head.*``).
"""
from typing import Dict, List, Optional

import torch
from torch.nn import functional as F

from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances

from .mask_ops import mask_loss

__all__ = ["OutputMaskBranch"]


class OutputMaskBranch:
    """Methods of the output mask branch; state (``final_mask_head``, ``final_pooler``, ``final_mask_loss_weight``)
    lives on the ROI heads."""

    @staticmethod
    def output_mask_parts(cfg, build_head, roi_shape: ShapeSpec, scales) -> Dict[str, object]:
        """``final_mask_head`` (None: the stage-2 head predicts the output masks) and ``final_pooler`` (None: it
        reads the cascade's RoI features) of ``cfg``; ``build_head(cfg, name, shape)`` builds a mask head."""
        final = cfg.MODEL.MNC.FINAL_MASK_HEAD
        if not final.ENABLED:
            return {}
        parts, shape = {}, roi_shape
        if final.OWN_POOLER:  # its own RoI features, as Mask R-CNN's mask head
            mask = cfg.MODEL.ROI_MASK_HEAD
            parts["final_pooler"] = ROIPooler(output_size=mask.POOLER_RESOLUTION, scales=scales,
                                              sampling_ratio=mask.POOLER_SAMPLING_RATIO, pooler_type=mask.POOLER_TYPE)
            shape = ShapeSpec(channels=roi_shape.channels, height=mask.POOLER_RESOLUTION, width=mask.POOLER_RESOLUTION)
        parts["final_mask_head"] = build_head(cfg, cfg.MODEL.ROI_MASK_HEAD.NAME, shape)
        parts["final_mask_loss_weight"] = final.LOSS_WEIGHT
        return parts

    def _output_mask_features(self, features: List[torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """(R, C, P', P') RoI features of the head that predicts the output masks: the final head's own pooler
        (detached boxes) if it has one, else the cascade's RoI features."""
        if self.final_pooler is None:
            return self._roi_features(features, boxes)
        return self.final_pooler(features, [Boxes(b.tensor.detach()) for b in boxes])

    def _final_mask_inputs(self, features: List[torch.Tensor], rois: List[Instances],
                           roi_features: torch.Tensor) -> Optional[torch.Tensor]:
        """Training: (F, C, P', P') input of the final mask head, stage 2's foreground RoIs; None without one."""
        if self.final_mask_head is None:
            return None
        if self.final_pooler is None:
            return roi_features[cat([r.gt_classes for r in rois]) < self.num_classes]
        # pool only the foreground, as Mask R-CNN's mask head (RoIAlign's backward is costly on CPU)
        fg_boxes = [r.proposal_boxes[r.gt_classes < self.num_classes] for r in rois]
        return self._output_mask_features(features, fg_boxes)

    def _final_mask_loss(self, final_features: torch.Tensor, rois: List[Instances]) -> torch.Tensor:
        """``loss_mask_final``: the final mask head on stage 2's foreground RoIs."""
        final_logits = self._mask_logits(final_features, self.final_mask_head)  # (F, 1, M', M')
        final_targets = self._mask_targets(rois, final_logits.shape[-1])  # (F, M', M')
        return mask_loss(final_logits, final_targets) * self.final_mask_loss_weight

    def _refined_mask_loss(self, features: List[torch.Tensor], out, rois: List[Instances],
                           targets: List[Instances]) -> torch.Tensor:
        """``loss_mask_refined``: the output head on the foreground boxes as stage 3 regressed them (detached;
        labelled at refined_fg_iou): the frame in which masks_on_final_boxes predicts at test time."""
        refined = self._next_rois(out, rois, targets, prefix="roi_head_refined_masks")
        fg_rois = [r[r.gt_classes < self.num_classes] for r in refined]
        boxes = [Boxes(r.proposal_boxes.tensor.detach()) for r in fg_rois]
        head = self.final_mask_head or self.mask_head
        logits = self._mask_logits(self._output_mask_features(features, boxes), head)  # (F, 1, M, M)
        weight = self.final_mask_loss_weight if self.final_mask_head is not None else self.mask_loss_weight
        return mask_loss(logits, self._mask_targets(fg_rois, logits.shape[-1])) * weight

    def _masks_on_final_boxes(self, features: List[torch.Tensor], candidates: List[Instances]) -> List[Instances]:
        """The kept detections' masks predicted once more, on their final (regressed) boxes, by the output head;
        other candidates keep the mask of their RoI (voting votes each mask in the frame it was predicted in).
        Kept boxes thinner than refined_min_size are dropped."""
        kept = []
        for c in candidates:
            degenerate = ~c.pred_boxes.nonempty(threshold=self.refined_min_size)
            c.kept_rank[degenerate] = -1
            kept.append(torch.nonzero(c.kept_rank >= 0).squeeze(1))  # (D,)
        boxes = [c.pred_boxes[k] for c, k in zip(candidates, kept)]
        mask_probs = self._mask_logits(self._output_mask_features(features, boxes), self.final_mask_head).sigmoid()
        counts = [len(k) for k in kept]
        for c, k, probs in zip(candidates, kept, [mask_probs] if len(counts) == 1 else mask_probs.split(counts)):
            if c.pred_masks.shape[-2:] != probs.shape[-2:]:  # a final head of another mask size
                c.pred_masks = F.interpolate(c.pred_masks, size=probs.shape[-2:], mode="bilinear", align_corners=False)
            c.pred_masks[k] = probs
            c.mask_boxes.tensor[k] = c.pred_boxes.tensor[k]
        return candidates

    def forward_with_given_boxes(self, features: Dict[str, torch.Tensor], instances: List[Instances]) -> List[Instances]:
        """Masks for given detections (``pred_boxes``, ``pred_classes``; ``scores`` optional), predicted as
        inference predicts the kept detections' masks: by the output head on these boxes."""
        features = [features[f] for f in self.in_features]
        boxes = [x.pred_boxes for x in instances]
        mask_logits = self._mask_logits(self._output_mask_features(features, boxes), self.final_mask_head)
        out = []
        for inst, logits in zip(instances, mask_logits.split([len(x) for x in instances])):
            inst = Instances(inst.image_size, **inst.get_fields())
            if not inst.has("scores"):
                inst.scores = torch.ones(len(inst), device=logits.device)
            inst.pred_masks = logits.sigmoid()
            inst.mask_boxes = inst.pred_boxes
            inst.kept_rank = torch.arange(len(inst), device=logits.device)
            out.append(inst)
        return out
