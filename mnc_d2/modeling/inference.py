"""Turning stage-3 (and stage-5) outputs into scored candidates and NMS decisions.

MNC keeps every candidate, not only the NMS survivors, because mask voting averages the masks of
all same-class candidates around each kept instance.

Shape shorthand: R = RoIs of one image, K = foreground classes, C = candidates (RoI, class) pairs
scoring above the threshold, D = detections kept after NMS.
"""
from typing import Tuple

import torch

from detectron2.layers import batched_nms
from detectron2.structures import Boxes


def select_candidates(
    boxes: torch.Tensor,
    probs: torch.Tensor,
    image_shape: Tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Args:
        boxes: (R, K*4) class-specific or (R, 4) class-agnostic predicted boxes.
        probs: (R, K+1) class probabilities, background last.
        image_shape: (h, w) to clip boxes to.
    Returns:
        cand_boxes (C, 4), cand_scores (C,), cand_classes (C,), cand_rois (C,) index of the RoI each
        candidate comes from, keep (D,) indices into the candidates, best first.
    """
    num_rois = boxes.shape[0]
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)  # (R,)
    boxes = torch.where(valid[:, None], boxes, torch.zeros_like(boxes))
    num_box_classes = boxes.shape[1] // 4
    clipped = Boxes(boxes.reshape(-1, 4))
    clipped.clip(image_shape)
    boxes = clipped.tensor.view(num_rois, num_box_classes, 4)  # (R, K or 1, 4)

    scores = probs[:, :-1]  # (R, K)
    filter_mask = (scores > score_thresh) & valid[:, None]
    filter_inds = filter_mask.nonzero()  # (C, 2): RoI index, class index
    cand_rois, cand_classes = filter_inds[:, 0], filter_inds[:, 1]
    cand_boxes = boxes[cand_rois, cand_classes if num_box_classes > 1 else 0]
    cand_scores = scores[filter_mask]

    keep = batched_nms(cand_boxes, cand_scores, cand_classes, nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    return cand_boxes, cand_scores, cand_classes, cand_rois, keep
