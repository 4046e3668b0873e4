"""Image-space post-processing of MNC detections: rescale to the output resolution, then paste each
kept mask in the box it was predicted in, binarised at MODEL.MNC.TEST.MASK_THRESHOLD, or vote masks over
candidates.

Shape shorthand: C = candidates, D = kept detections, M = mask side, H x W = output image.
"""
import torch

from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import Boxes, Instances


def _rescaled(boxes: Boxes, scale_x: float, scale_y: float) -> Boxes:
    out = Boxes(boxes.tensor.clone())
    out.scale(scale_x, scale_y)
    return out


def mnc_postprocess(
    candidates: Instances,
    output_height: int,
    output_width: int,
    mask_threshold: float = 0.4,
    mask_voting: bool = True,
    voting_iou: float = 0.5,
) -> Instances:
    """
    Args:
        candidates: output of :class:`MNCROIHeads` for one image, at the network's input resolution,
            with fields ``pred_boxes`` (C), ``scores`` (C), ``pred_classes`` (C), ``pred_masks``
            (C, 1, M, M) soft masks, ``mask_boxes`` (C) the box each mask was predicted in, and
            ``kept_rank`` (C) the rank after NMS (-1 = not kept).
        output_height, output_width: resolution of the returned instances.
    Returns:
        D2-standard Instances of the kept detections: ``pred_boxes``, ``scores``, ``pred_classes``,
        ``pred_masks`` (D, H, W) bool.
    """
    scale_x = output_width / candidates.image_size[1]
    scale_y = output_height / candidates.image_size[0]
    pred_boxes = _rescaled(candidates.pred_boxes, scale_x, scale_y)
    pred_boxes.clip((output_height, output_width))
    mask_boxes = _rescaled(candidates.mask_boxes, scale_x, scale_y)

    ranks = candidates.kept_rank
    keep = torch.nonzero(ranks >= 0).squeeze(1)
    keep = keep[torch.argsort(ranks[keep])]  # (D,) best first
    keep = keep[pred_boxes[keep].nonempty()]

    result = Instances((output_height, output_width))
    result.scores = candidates.scores[keep]
    result.pred_classes = candidates.pred_classes[keep]
    soft_masks = candidates.pred_masks[:, 0]  # (C, M, M)
    if mask_voting:
        from .mask_voting import mask_voting

        voted_masks, voted_boxes = mask_voting(
            mask_boxes.tensor, soft_masks, candidates.scores, candidates.pred_classes, keep,
            (output_height, output_width), iou_threshold=voting_iou, mask_threshold=mask_threshold,
            fallback_boxes=pred_boxes.tensor[keep],  # an empty voted mask keeps the regressed box
        )
        result.pred_boxes = Boxes(voted_boxes)
        result.pred_masks = voted_masks
    else:
        result.pred_boxes = pred_boxes[keep]
        result.pred_masks = paste_masks_in_image(
            soft_masks[keep], mask_boxes[keep], (output_height, output_width), threshold=mask_threshold
        )
    return result
