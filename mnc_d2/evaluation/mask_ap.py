"""mAP^r: mask-level average precision, the metric of SDS, MNC and FCIS.

Pure numpy functions; masks travel as COCO RLE dicts (``pycocotools.mask``).

Protocol (per class, per IoU threshold):
  1. rank every prediction of the class over the whole dataset by score;
  2. walk each image's predictions in that order; a prediction is a true
     positive if its *mask* IoU with a still-unmatched ground truth (GT) of
     the same class in the same image is >= the threshold, and that GT is then
     consumed; a prediction that only reaches an *ignored* GT (``iscrowd`` or
     ``difficult``) counts neither as TP nor FP; everything else is a false
     positive (duplicates included);
  3. AP = area under the precision/recall curve; classes without any
     non-ignored GT are left out of the mean.

Choices, and how they relate to the reference code:
  - ``interpolation="voc"`` (default): VOC2010+ area under the monotone
    precision envelope. ``"voc07"``: VOC2007 11-point average. ``"coco101"``:
    COCO's 101-point average, which with ``assignment="unmatched"`` equals
    pycocotools' ``COCOeval`` (segm, area "all", maxDets >= predictions per
    image and class) exactly. NOTE: the public MNC and FCIS code evaluate
    mAP^r with the 11-point VOC07 average (``use_07_metric = True``, "according
    to SDS's evaluation protocol"); pass ``"voc07"`` to reproduce their numbers.
  - ``assignment="unmatched"`` (default, as COCO): a prediction takes the
    highest-IoU GT among those not yet matched. ``"argmax"`` (SDS / MNC
    ``voc_eval_sds``): a prediction takes its highest-IoU GT overall and is a
    FP if that GT was already matched. They differ only where GTs overlap.
  - IoU with an ``iscrowd`` GT is intersection over the prediction's area
    (COCO's crowd rule); ignored GTs may absorb any number of predictions.

Shape shorthand: D predictions and G GTs of one class in one image,
T IoU thresholds, K classes.
"""
from collections import defaultdict
from typing import Dict, List, Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_util

from detectron2.evaluation.pascal_voc_evaluation import voc_ap as d2_voc_ap

INTERPOLATIONS = ("voc", "voc07", "coco101")
ASSIGNMENTS = ("unmatched", "argmax")

# Labels of a ranked prediction.
TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1


def mask_iou(pred_rles: Sequence[dict], gt_rles: Sequence[dict], gt_iscrowd=None) -> np.ndarray:
    """IoU of every predicted mask with every GT mask of one image.

    Args:
        pred_rles: D RLE dicts ({"size": [H, W], "counts": str | bytes}).
        gt_rles: G RLE dicts of the same size.
        gt_iscrowd: optional (G,) flags; a crowd GT's IoU is |P ∩ G| / |P|.
    Returns:
        (D, G) float64 array.
    """
    num_pred, num_gt = len(pred_rles), len(gt_rles)
    if num_pred == 0 or num_gt == 0:
        return np.zeros((num_pred, num_gt), dtype=np.float64)
    sizes = {tuple(r["size"]) for r in pred_rles} | {tuple(r["size"]) for r in gt_rles}
    if len(sizes) != 1:
        raise ValueError(f"All masks of one image must have the same size, got {sorted(sizes)}")
    iscrowd = [0] * num_gt if gt_iscrowd is None else [int(bool(c)) for c in gt_iscrowd]
    ious = mask_util.iou(list(pred_rles), list(gt_rles), iscrowd)
    return np.asarray(ious, dtype=np.float64).reshape(num_pred, num_gt)


def _last_argmax(values: np.ndarray) -> int:
    # COCOeval keeps the *last* GT among equal IoUs; mirror it so ties agree.
    return len(values) - 1 - int(np.argmax(values[::-1]))


def match_predictions(
    ious: np.ndarray,
    gt_ignore: np.ndarray,
    iou_threshold: float,
    assignment: str = "unmatched",
) -> np.ndarray:
    """Greedily label the predictions of one class in one image.

    Args:
        ious: (D, G) mask IoUs; rows sorted by descending score.
        gt_ignore: (G,) bool, True for iscrowd / difficult GTs.
        iou_threshold: a match needs IoU >= this.
        assignment: "unmatched" (COCO) or "argmax" (SDS / MNC), see module doc.
    Returns:
        (D,) int8 labels: TRUE_POSITIVE, FALSE_POSITIVE or IGNORED.
    """
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    num_pred, num_gt = ious.shape
    labels = np.full(num_pred, FALSE_POSITIVE, dtype=np.int8)
    if num_gt == 0:
        return labels
    gt_ignore = np.asarray(gt_ignore, dtype=bool)
    matched = np.zeros(num_gt, dtype=bool)  # (G,)
    # As COCOeval: cap just below 1 so a perfect mask still matches at t = 1 despite rounding.
    threshold = min(iou_threshold, 1 - 1e-10)
    for d in range(num_pred):
        iou_d = ious[d]  # (G,)
        if assignment == "argmax":
            g = int(np.argmax(iou_d))
            if iou_d[g] < threshold:
                continue
            if gt_ignore[g]:
                labels[d] = IGNORED
            elif not matched[g]:
                labels[d] = TRUE_POSITIVE
                matched[g] = True
            continue
        # COCO order: any free, non-ignored GT above threshold wins over an ignored one.
        for candidates, label in ((~gt_ignore & ~matched, TRUE_POSITIVE), (gt_ignore, IGNORED)):
            scores = np.where(candidates & (iou_d >= threshold), iou_d, -1.0)
            if scores.max() >= 0:
                g = _last_argmax(scores)
                labels[d] = label
                matched[g] = True
                break
    return labels


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """VOC average precision of one class: D2's ``voc_ap`` (the VOC devkit's), on float64 arrays.

    Args:
        recall, precision: (N,) cumulative values along the ranked predictions.
        use_07_metric: VOC2007 11-point average instead of the VOC2010+ area
            under the monotone precision envelope.
    """
    return float(d2_voc_ap(np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64),
                           use_07_metric))


def coco_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's 101-point interpolated AP of one class (as COCOeval.accumulate)."""
    recall = np.asarray(recall, dtype=np.float64)
    envelope = np.maximum.accumulate(np.asarray(precision, dtype=np.float64)[::-1])[::-1]
    recall_thresholds = np.linspace(0.0, 1.0, 101)
    inds = np.searchsorted(recall, recall_thresholds, side="left")  # (101,)
    sampled = np.zeros(len(recall_thresholds))
    valid = inds < len(envelope)
    sampled[valid] = envelope[inds[valid]]
    return float(sampled.mean())


def average_precision(
    recall: np.ndarray, precision: np.ndarray, interpolation: str = "voc"
) -> float:
    """AP under one of INTERPOLATIONS."""
    if interpolation == "voc":
        return voc_ap(recall, precision, use_07_metric=False)
    if interpolation == "voc07":
        return voc_ap(recall, precision, use_07_metric=True)
    if interpolation == "coco101":
        return coco_ap(recall, precision)
    raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


def precision_recall(scores: np.ndarray, labels: np.ndarray, num_gt: int):
    """Precision and recall along predictions ranked over the whole dataset.

    Args:
        scores, labels: (N,) of one class and one threshold; IGNORED ones are dropped.
        num_gt: number of non-ignored GTs of the class (> 0).
    Returns:
        recall, precision: (N',) arrays.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    labels = np.asarray(labels)[order]
    labels = labels[labels != IGNORED]
    tp = np.cumsum(labels == TRUE_POSITIVE, dtype=np.float64)
    fp = np.cumsum(labels == FALSE_POSITIVE, dtype=np.float64)
    recall = tp / float(num_gt)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision


def evaluate_mask_ap(
    predictions: Sequence[Mapping],
    ground_truths: Sequence[Mapping],
    num_classes: int,
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    interpolation: str = "voc",
    assignment: str = "unmatched",
) -> Dict[str, np.ndarray]:
    """mAP^r over a dataset.

    Args:
        predictions: one dict per predicted instance, COCO-result style:
            {"image_id", "category_id" (0..K-1), "score", "segmentation" (RLE)}.
        ground_truths: one dict per GT instance:
            {"image_id", "category_id", "segmentation" (RLE),
             optional "iscrowd", optional "difficult"}.
            Images with predictions but no GT entries have no GT.
        num_classes: K.
        iou_thresholds: T mask-IoU thresholds.
        interpolation, assignment: see module docstring.
    Returns:
        dict with "iou_thresholds" (T,), "ap" (T, K) in [0, 1] with NaN for
        classes without non-ignored GT, "mean_ap" (T,) (NaN if no class has
        GT), "num_gt" (K,) non-ignored GT counts.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)  # (T,)

    preds_by_key = defaultdict(list)  # (image_id, class) -> predictions
    for p in predictions:
        _check_category(p["category_id"], num_classes, "prediction")
        preds_by_key[(p["image_id"], int(p["category_id"]))].append(p)
    gts_by_key = defaultdict(list)
    num_gt = np.zeros(num_classes, dtype=np.int64)  # (K,)
    for g in ground_truths:
        _check_category(g["category_id"], num_classes, "ground truth")
        gts_by_key[(g["image_id"], int(g["category_id"]))].append(g)
        num_gt[int(g["category_id"])] += not _is_ignored(g)

    scores: List[List[np.ndarray]] = [[] for _ in range(num_classes)]
    labels: List[List[List[np.ndarray]]] = [[[] for _ in range(num_classes)] for _ in thresholds]
    for (image_id, k), preds in preds_by_key.items():
        preds = sorted(preds, key=lambda p: -float(p["score"]))  # stable, as COCOeval
        gts = gts_by_key.get((image_id, k), [])
        ious = mask_iou(
            [p["segmentation"] for p in preds],
            [g["segmentation"] for g in gts],
            [g.get("iscrowd", 0) for g in gts],
        )  # (D, G)
        gt_ignore = np.array([_is_ignored(g) for g in gts], dtype=bool)  # (G,)
        scores[k].append(np.array([float(p["score"]) for p in preds]))
        for t, threshold in enumerate(thresholds):
            labels[t][k].append(match_predictions(ious, gt_ignore, threshold, assignment))

    ap = np.full((len(thresholds), num_classes), np.nan)  # (T, K)
    for k in np.nonzero(num_gt)[0]:
        class_scores = np.concatenate(scores[k]) if scores[k] else np.zeros(0)
        for t in range(len(thresholds)):
            class_labels = np.concatenate(labels[t][k]) if labels[t][k] else np.zeros(0, np.int8)
            recall, precision = precision_recall(class_scores, class_labels, int(num_gt[k]))
            ap[t, k] = average_precision(recall, precision, interpolation)
    has_gt = num_gt > 0
    mean_ap = ap[:, has_gt].mean(axis=1) if has_gt.any() else np.full(len(thresholds), np.nan)
    return {"iou_thresholds": thresholds, "ap": ap, "mean_ap": mean_ap, "num_gt": num_gt}


def _is_ignored(gt: Mapping) -> bool:
    return bool(gt.get("iscrowd", 0)) or bool(gt.get("difficult", 0))


def _check_category(category_id, num_classes: int, what: str) -> None:
    if not 0 <= int(category_id) < num_classes:
        raise ValueError(
            f"{what} category_id {category_id} outside [0, {num_classes}); "
            "mAP^r expects contiguous ids as in Detectron2 dataset dicts"
        )
