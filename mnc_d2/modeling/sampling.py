"""RoI sampling for MNC stages 2/3 (reference: 64 RoIs/image, <= 30% foreground at IoU >= 0.5,
background 85% from IoU [0.1, 0.5) and 15% from [0, 0.1)).

D2's ``subsample_labels`` draws background uniformly; MNC splits it into a hard and an easy range,
which needs each proposal's max IoU, so the sampler takes IoUs rather than matcher labels.

Shape shorthand: P = proposals of one image (GT appended), G = GT instances.
"""
from typing import Tuple

import torch



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

