"""ROI heads of the benchmark's controls: Mask R-CNN given MNC's RoI sampling. Registered when the
benchmark worker imports this module; not part of the mnc_d2 package."""
import torch

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads

from mnc_d2.modeling.sampling import sample_mnc_rois

__all__ = ["HardBackgroundROIHeads"]


class _MaxIoUMatcher:
    """D2's proposal matcher, keeping the max IoU of each proposal of the last call (P,) for the sampler."""

    def __init__(self, matcher):
        self.matcher, self.max_iou = matcher, None

    def __call__(self, iou: torch.Tensor):  # (G, P)
        self.max_iou = iou.max(dim=0).values if iou.numel() else iou.new_zeros(iou.shape[1])
        return self.matcher(iou)


@ROI_HEADS_REGISTRY.register()
class HardBackgroundROIHeads(StandardROIHeads):
    """D2's Mask R-CNN ROI heads with MNC's RoI sampling (:func:`sample_mnc_rois`: background split into a hard and
    an easy IoU range, ``MODEL.MNC.BG_IOU_LO`` / ``BG_HARD_FRACTION``): the control that gives Mask R-CNN MNC's
    recipe. Only the sampling differs (D2's ``_sample_proposals``); ignore labels (-1) are not used by MNC's rule."""

    @configurable
    def __init__(self, *, bg_iou_lo: float, bg_hard_fraction: float, **kwargs):
        super().__init__(**kwargs)
        self.proposal_matcher = _MaxIoUMatcher(self.proposal_matcher)
        self.bg_iou_lo, self.bg_hard_fraction = bg_iou_lo, bg_hard_fraction

    @classmethod
    def from_config(cls, cfg, input_shape):
        return dict(super().from_config(cfg, input_shape), bg_iou_lo=cfg.MODEL.MNC.BG_IOU_LO,
                    bg_hard_fraction=cfg.MODEL.MNC.BG_HARD_FRACTION)

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        if gt_classes.numel():
            gt_classes = gt_classes[matched_idxs]
            gt_classes[matched_labels == 0] = self.num_classes
        else:
            gt_classes = torch.full_like(matched_idxs, self.num_classes)
        fg_iou = self.proposal_matcher.matcher.thresholds[-2]  # D2's foreground IoU (ROI_HEADS.IOU_THRESHOLDS)
        fg, bg = sample_mnc_rois(self.proposal_matcher.max_iou, self.batch_size_per_image, self.positive_fraction,
                                 fg_iou, self.bg_iou_lo, self.bg_hard_fraction)
        sampled = torch.cat([fg, bg])
        return sampled, gt_classes[sampled]
