"""RoI sampling for MNC stages 2/3 (reference: 64 RoIs/image, <= 30% foreground at IoU >= 0.5,
background 85% from IoU [0.1, 0.5) and 15% from [0, 0.1)).

D2's ``subsample_labels`` draws background uniformly; MNC splits it into a hard and an easy range,
which needs each proposal's max IoU, so the sampler takes IoUs rather than matcher labels.

Shape shorthand: P = proposals of one image (GT appended), G = GT instances.
"""
from typing import Tuple

import torch

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads


def _random_subset(indices: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` distinct elements of the 1-D tensor ``indices``, uniformly at random."""
    k = min(k, indices.numel())
    return indices[torch.randperm(indices.numel(), device=indices.device)[:k]]


def sample_mnc_rois(
    max_ious: torch.Tensor,
    batch_size: int,
    positive_fraction: float,
    fg_iou: float,
    bg_iou_lo: float,
    bg_hard_fraction: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        max_ious: (P,) each proposal's highest IoU with any GT box (0 where there is no GT).
        batch_size: RoIs wanted per image.
        positive_fraction: at most this share of ``batch_size`` is foreground.
        fg_iou: foreground if ``max_iou >= fg_iou``.
        bg_iou_lo: background is "hard" if ``bg_iou_lo <= max_iou < fg_iou``, "easy" below.
        bg_hard_fraction: share of the background drawn from the hard range (topped up from the other
            range when one runs short).
    Returns:
        fg_idx (F,), bg_idx (B,): indices into the proposals, F + B <= batch_size.
    """
    fg_candidates = torch.nonzero(max_ious >= fg_iou).squeeze(1)
    hard_candidates = torch.nonzero((max_ious >= bg_iou_lo) & (max_ious < fg_iou)).squeeze(1)
    easy_candidates = torch.nonzero(max_ious < bg_iou_lo).squeeze(1)

    fg_idx = _random_subset(fg_candidates, int(batch_size * positive_fraction))
    num_bg = batch_size - fg_idx.numel()
    num_hard = min(int(round(num_bg * bg_hard_fraction)), hard_candidates.numel())
    num_easy = min(num_bg - num_hard, easy_candidates.numel())
    num_hard = min(num_bg - num_easy, hard_candidates.numel())  # top up hard if easy ran short
    bg_idx = torch.cat([_random_subset(hard_candidates, num_hard), _random_subset(easy_candidates, num_easy)])
    return fg_idx, bg_idx


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
