"""Stage 1 with end-to-end box gradients: an RPN whose proposals keep the autograd graph of the
predicted anchor deltas (D2's RPN decodes and selects proposals under ``torch.no_grad``).

Which proposals are kept (top-k per level, NMS, size filter) is decided without gradient; the kept
boxes are gathered, with gradient, from the decoded deltas, so losses of stages 2-5 reach the RPN's
box-delta conv through the RoI coordinates (with a differentiable RoI warp, MODEL.MNC.BOX_GRADIENTS).
With ``delta_clip`` that gradient is bounded on the deltas, as the authors' proposal layer does.
"""
from typing import List, Tuple

import torch

from detectron2.config import configurable
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.structures import Boxes, Instances

from .box_gradients import clip_delta_gradient


@PROPOSAL_GENERATOR_REGISTRY.register()
class MNCRPN(RPN):
    """D2's RPN; with ``box_gradients`` on, training proposals stay differentiable w.r.t. the deltas."""

    @configurable
    def __init__(self, *, box_gradients: bool = False, delta_clip: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.box_gradients = box_gradients
        self.delta_clip = delta_clip  # per image: the bound on the batch gradient is delta_clip / N

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box_gradients"] = cfg.MODEL.MNC.BOX_GRADIENTS.ENABLED
        ret["delta_clip"] = cfg.MODEL.MNC.BOX_GRADIENTS.DELTA_CLIP
        return ret

    def predict_proposals(self, anchors: List[Boxes], pred_objectness_logits: List[torch.Tensor],
                          pred_anchor_deltas: List[torch.Tensor], image_sizes: List[Tuple[int, int]]) -> List[Instances]:
        if not (self.box_gradients and self.training):
            return super().predict_proposals(anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)
        # D2 averages the RoI losses over the batch's N images, the authors had one image: bound / N
        bound = self.delta_clip / max(len(image_sizes), 1)
        if bound > 0:  # one clip over all levels: one clipped-fraction value per step
            sizes = [d.shape[1] for d in pred_anchor_deltas]
            all_deltas = clip_delta_gradient(torch.cat(pred_anchor_deltas, dim=1), bound, "rpn_delta")  # (N, A_all, 4)
            pred_anchor_deltas = list(all_deltas.split(sizes, dim=1))
        # (N, Hi*Wi*A, 4) per level, differentiable w.r.t. the deltas; selection uses detached scores
        pred_proposals = self._decode_proposals(anchors, pred_anchor_deltas)
        return find_top_rpn_proposals(
            pred_proposals, [logits.detach() for logits in pred_objectness_logits], image_sizes,
            self.nms_thresh, self.pre_nms_topk[self.training], self.post_nms_topk[self.training],
            self.min_box_size, self.training,
        )
