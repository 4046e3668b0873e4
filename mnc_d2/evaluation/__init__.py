"""Evaluation of MNC: mAP^r, the mask-level AP of SDS / MNC / FCIS."""
from .mask_ap import (
    average_precision,
    coco_ap,
    evaluate_mask_ap,
    mask_iou,
    match_predictions,
    voc_ap,
)
from .mapr_evaluator import MaskAPrEvaluator

__all__ = [
    "MaskAPrEvaluator",
    "average_precision",
    "coco_ap",
    "evaluate_mask_ap",
    "mask_iou",
    "match_predictions",
    "voc_ap",
]
