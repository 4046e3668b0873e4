"""Tests of mAP^r: hand-computed cases, pycocotools agreement, the D2 evaluator."""
import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import BitMasks
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode, Instances

from mnc_d2.evaluation import (
    MaskAPrEvaluator,
    evaluate_mask_ap,
    mask_iou,
    match_predictions,
    voc_ap,
)
from mnc_d2.evaluation.mask_ap import FALSE_POSITIVE, IGNORED, TRUE_POSITIVE


def box_mask(height, width, y0, y1, x0, x1):
    """(H, W) uint8 mask with rows [y0, y1) and columns [x0, x1) set."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def rle(mask):
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("utf-8")
    return encoded


def pred(image_id, category_id, score, mask):
    return {
        "image_id": image_id,
        "category_id": category_id,
        "score": score,
        "segmentation": rle(mask),
    }


def gt(image_id, category_id, mask, iscrowd=0):
    return {
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle(mask),
        "iscrowd": iscrowd,
    }


# Image "a" (10 x 20): two 10 x 10 GTs side by side; image "b" (10 x 10): one GT.
# Predictions, by score: p1 covers 8/10 of a1 (IoU 0.8), p2 covers 6/10 of a1 (IoU 0.6,
# a duplicate), p3 covers 6/10 of b1 (IoU 0.6), p4 equals a2 (IoU 1).
#   IoU 0.5: TP FP TP TP -> precision 1, 1/2, 2/3, 3/4; recall 1/3, 1/3, 2/3, 1
#   IoU 0.7: TP FP FP TP -> precision 1, 1/2, 1/3, 1/2; recall 1/3, 1/3, 1/3, 2/3
HAND_GTS = [
    gt("a", 0, box_mask(10, 20, 0, 10, 0, 10)),
    gt("a", 0, box_mask(10, 20, 0, 10, 10, 20)),
    gt("b", 0, box_mask(10, 10, 0, 10, 0, 10)),
]
HAND_PREDS = [
    pred("a", 0, 0.9, box_mask(10, 20, 0, 10, 0, 8)),
    pred("a", 0, 0.8, box_mask(10, 20, 0, 10, 0, 6)),
    pred("b", 0, 0.7, box_mask(10, 10, 0, 10, 0, 6)),
    pred("a", 0, 0.6, box_mask(10, 20, 0, 10, 10, 20)),
]


@pytest.mark.parametrize(
    "interpolation, expected_05, expected_07",
    [
        # envelope 1 | 3/4 | 3/4 over recall thirds; at 0.7: 1 | 1/2 | 0.
        ("voc", (1 + 0.75 + 0.75) / 3, 1 / 3 + 0.5 / 3),
        # t = 0 .. 0.3 -> 1 (4 points); t = 0.4 .. 1 -> 3/4 (7 points); at 0.7: 4 x 1 + 3 x 1/2.
        ("voc07", (4 + 7 * 0.75) / 11, (4 + 3 * 0.5) / 11),
        # recall thresholds 0 .. 0.33 (34 points) -> 1, the 67 others -> 3/4;
        # at 0.7: 34 x 1 + 33 x 1/2 (recall 2/3 is never passed).
        ("coco101", (34 + 67 * 0.75) / 101, (34 + 33 * 0.5) / 101),
    ],
)
def test_hand_computed_ap(interpolation, expected_05, expected_07):
    results = evaluate_mask_ap(
        HAND_PREDS, HAND_GTS, num_classes=1, iou_thresholds=(0.5, 0.7), interpolation=interpolation
    )
    np.testing.assert_allclose(results["ap"][:, 0], [expected_05, expected_07], atol=1e-12)
    np.testing.assert_allclose(results["mean_ap"], [expected_05, expected_07], atol=1e-12)
    assert results["num_gt"].tolist() == [3]


def test_mask_iou_values():
    ious = mask_iou(
        [h["segmentation"] for h in HAND_PREDS[:2]], [g["segmentation"] for g in HAND_GTS[:2]]
    )
    np.testing.assert_allclose(ious, [[0.8, 0.0], [0.6, 0.0]])
    assert mask_iou([], [HAND_GTS[0]["segmentation"]]).shape == (0, 1)
    with pytest.raises(ValueError, match="same size"):
        mask_iou([HAND_PREDS[2]["segmentation"]], [HAND_GTS[0]["segmentation"]])


def test_voc_ap_perfect_and_empty():
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]), use_07_metric=True) == pytest.approx(
        1.0
    )
    assert voc_ap(np.zeros(0), np.zeros(0)) == 0.0


def test_duplicates_are_false_positives():
    ious = np.array([[0.9], [0.9], [0.2]])
    for assignment in ("unmatched", "argmax"):
        labels = match_predictions(ious, np.array([False]), 0.5, assignment)
        assert labels.tolist() == [TRUE_POSITIVE, FALSE_POSITIVE, FALSE_POSITIVE]


def test_assignment_modes_differ_on_overlapping_gts():
    # The second prediction's best GT is taken; "unmatched" falls back to the other GT.
    ious = np.array([[0.9, 0.6], [0.8, 0.7]])
    assert match_predictions(ious, np.zeros(2, bool), 0.5, "unmatched").tolist() == [1, 1]
    assert match_predictions(ious, np.zeros(2, bool), 0.5, "argmax").tolist() == [1, 0]


def test_crowd_gt_is_ignored():
    crowd = box_mask(10, 20, 0, 10, 10, 20)
    gts = [gt("a", 0, box_mask(10, 20, 0, 10, 0, 10)), gt("a", 0, crowd, iscrowd=1)]
    preds = [
        pred("a", 0, 0.9, crowd),  # lands on the crowd region: neither TP nor FP
        pred("a", 0, 0.8, box_mask(10, 20, 2, 8, 12, 18)),  # inside the crowd too
        pred("a", 0, 0.7, box_mask(10, 20, 0, 10, 0, 10)),
    ]
    results = evaluate_mask_ap(preds, gts, num_classes=1)
    assert results["num_gt"].tolist() == [1]
    assert results["ap"][0, 0] == pytest.approx(1.0)
    # Without the crowd flag the two first predictions are false positives.
    plain = [dict(g, iscrowd=0) for g in gts]
    assert evaluate_mask_ap(preds, plain, num_classes=1)["ap"][0, 0] < 0.9
    labels = match_predictions(np.array([[0.0, 1.0]]), np.array([False, True]), 0.5)
    assert labels.tolist() == [IGNORED]


def test_class_without_gt_is_excluded_from_mean():
    extra = pred("a", 1, 0.95, box_mask(10, 20, 0, 10, 0, 10))  # class 1 has no GT
    results = evaluate_mask_ap(HAND_PREDS + [extra], HAND_GTS, num_classes=3, iou_thresholds=(0.5,))
    assert np.isnan(results["ap"][0, 1]) and np.isnan(results["ap"][0, 2])
    assert results["mean_ap"][0] == pytest.approx((1 + 0.75 + 0.75) / 3)


def test_class_with_gt_but_no_predictions_counts_as_zero():
    gts = HAND_GTS + [gt("b", 1, box_mask(10, 10, 0, 5, 0, 5))]
    results = evaluate_mask_ap(HAND_PREDS, gts, num_classes=2, iou_thresholds=(0.5,))
    assert results["ap"][0, 1] == 0.0
    assert results["mean_ap"][0] == pytest.approx((1 + 0.75 + 0.75) / 3 / 2)


def test_empty_predictions_give_zero_ap():
    results = evaluate_mask_ap([], HAND_GTS, num_classes=1)
    assert results["ap"].tolist() == [[0.0], [0.0]]
    assert results["mean_ap"].tolist() == [0.0, 0.0]


def test_perfect_predictions_give_full_ap():
    preds = [dict(g, score=1.0 - 0.1 * i) for i, g in enumerate(HAND_GTS)]
    for interpolation in ("voc", "voc07", "coco101"):
        results = evaluate_mask_ap(preds, HAND_GTS, num_classes=1, interpolation=interpolation)
        np.testing.assert_allclose(results["mean_ap"], [1.0, 1.0])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        evaluate_mask_ap(HAND_PREDS, HAND_GTS, num_classes=1, interpolation="11pt")
    with pytest.raises(ValueError, match="category_id"):
        evaluate_mask_ap(HAND_PREDS, HAND_GTS, num_classes=0)


# ----------------------------------------------------------------- pycocotools


def random_box(rng, height, width):
    y0, x0 = int(rng.integers(0, height - 10)), int(rng.integers(0, width - 10))
    return y0, int(rng.integers(y0 + 8, height + 1)), x0, int(rng.integers(x0 + 8, width + 1))


def ragged_mask(rng, height, width, box, flip_rate):
    """A box mask whose pixels near the box flip with `flip_rate`, so IoUs take many values."""
    y0, y1, x0, x1 = box
    near_box = box_mask(height, width, max(y0 - 1, 0), y1 + 1, max(x0 - 1, 0), x1 + 1)
    flips = (rng.random((height, width)) < flip_rate).astype(np.uint8) & near_box
    return box_mask(height, width, *box) ^ flips


def random_case(rng, num_images=5, num_classes=3, height=32, width=40):
    """GTs (some crowd, some overlapping same-class pairs), their jittered copies as
    predictions, and false positives."""
    gts, preds = [], []
    for image_id in range(num_images):
        box, category = None, None
        for _ in range(rng.integers(0, 7)):
            if box is not None and rng.random() < 0.4:  # a neighbour of the previous GT
                y0, y1, x0, x1 = box
                dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
                box = (max(y0 + dy, 0), max(y1 + dy, 1), max(x0 + dx, 0), max(x1 + dx, 1))
            else:
                box, category = random_box(rng, height, width), int(rng.integers(num_classes))
            gts.append(
                gt(
                    image_id,
                    category,
                    ragged_mask(rng, height, width, box, 0.05),
                    iscrowd=int(rng.random() < 0.15),
                )
            )
            for _ in range(rng.integers(0, 4)):  # jittered copies, some with the wrong class
                jittered = tuple(
                    int(c) for c in np.clip(np.array(box) + rng.integers(-2, 3, size=4), 0, None)
                )
                y0, y1, x0, x1 = jittered
                jittered = (y0, max(y1, y0 + 1), x0, max(x1, x0 + 1))
                noisy_class = category if rng.random() < 0.85 else int(rng.integers(num_classes))
                mask = ragged_mask(rng, height, width, jittered, 0.03)
                preds.append(pred(image_id, noisy_class, float(rng.random()), mask))
        for _ in range(rng.integers(0, 3)):  # pure false positives
            mask = ragged_mask(rng, height, width, random_box(rng, height, width), 0.05)
            preds.append(pred(image_id, int(rng.integers(num_classes)), float(rng.random()), mask))
    return gts, preds, num_images, num_classes, (height, width)


def cocoeval_per_class_ap(gts, preds, num_images, num_classes, size, iou_thresholds):
    """Per-class AP (T, K) from pycocotools, NaN where COCOeval has no GT."""
    height, width = size
    dataset = {
        "images": [{"id": i, "height": height, "width": width} for i in range(num_images)],
        "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
        "annotations": [
            dict(
                g,
                id=n + 1,
                category_id=g["category_id"] + 1,
                area=float(mask_util.area(g["segmentation"])),
            )
            for n, g in enumerate(gts)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(p, category_id=p["category_id"] + 1) for p in preds])
        coco_eval = COCOeval(coco_gt, coco_dt, "segm")
        coco_eval.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T, R, K), area "all", maxDets 100
    ap = np.where((precision > -1).all(axis=1), precision.mean(axis=1), np.nan)
    return ap  # (T, K)


@pytest.mark.parametrize("seed", range(6))
def test_coco101_matches_pycocotools(seed):
    rng = np.random.default_rng(seed)
    gts, preds, num_images, num_classes, size = random_case(rng)
    thresholds = (0.5, 0.7, 0.9)
    expected = cocoeval_per_class_ap(gts, preds, num_images, num_classes, size, thresholds)
    ours = evaluate_mask_ap(preds, gts, num_classes, thresholds, interpolation="coco101")["ap"]
    np.testing.assert_allclose(ours, expected, atol=1e-9, equal_nan=True)


# ------------------------------------------------------------------ D2 evaluator

DATASET = "_mnc_test_mapr_tiny"
CLASSES = ["cat", "dog", "bird"]


def tiny_dataset_dicts():
    """Image 1: bitmask GT; image 2: RLE GT plus a crowd; class "bird" has no GT."""
    return [
        {
            "file_name": "1.jpg",
            "image_id": 1,
            "height": 10,
            "width": 20,
            "annotations": [
                {
                    "bbox": [0, 0, 10, 10],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": 0,
                    "segmentation": box_mask(10, 20, 0, 10, 0, 10),
                    "iscrowd": 0,
                },
                {
                    "bbox": [10, 0, 20, 10],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": 1,
                    "segmentation": rle(box_mask(10, 20, 0, 10, 10, 20)),
                    "iscrowd": 0,
                },
            ],
        },
        {
            "file_name": "2.jpg",
            "image_id": 2,
            "height": 10,
            "width": 10,
            "annotations": [
                {
                    "bbox": [0, 0, 5, 10],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": 0,
                    "segmentation": rle(box_mask(10, 10, 0, 10, 0, 5)),
                    "iscrowd": 0,
                },
                {
                    "bbox": [5, 0, 10, 10],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": 1,
                    "segmentation": [[5, 0, 10, 0, 10, 10, 5, 10]],
                    "iscrowd": 1,
                },
            ],
        },
    ]


@pytest.fixture(scope="module")
def tiny_dataset():
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    DatasetCatalog.register(DATASET, tiny_dataset_dicts)
    MetadataCatalog.get(DATASET).set(thing_classes=CLASSES, evaluator_type="mapr")
    yield DATASET
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def make_instances(height, width, masks, scores, classes):
    instances = Instances((height, width))
    instances.pred_masks = torch.as_tensor(
        np.stack(masks) if masks else np.zeros((0, height, width)), dtype=torch.bool
    )
    instances.scores = torch.tensor(scores, dtype=torch.float32)
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()  # D2's predictions carry boxes
    return instances


def test_evaluator_end_to_end(tiny_dataset, tmp_path):
    evaluator = MaskAPrEvaluator(tiny_dataset, output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    outputs_1 = make_instances(
        10, 20, [box_mask(10, 20, 0, 10, 0, 8), box_mask(10, 20, 0, 10, 10, 20)], [0.9, 0.8], [0, 1]
    )
    # Image 2: a cat covering 3/5 of the GT (IoU 0.6) and a dog on the crowd region (ignored).
    outputs_2 = make_instances(
        10, 10, [box_mask(10, 10, 0, 10, 0, 3), box_mask(10, 10, 0, 10, 5, 10)], [0.7, 0.95], [0, 1]
    )
    evaluator.process(
        [{"image_id": 1}, {"image_id": 2}], [{"instances": outputs_1}, {"instances": outputs_2}]
    )
    metrics = evaluator.evaluate()["segm_mAPr"]

    # cat: two GTs, TP at IoU 0.8 and 0.6 -> AP 1 at 0.5; only the first at 0.7 -> AP 0.5.
    # dog: one GT, one TP (IoU 1) -> AP 1 at both thresholds. bird: no GT.
    assert metrics["AP-cat@0.5"] == pytest.approx(100.0)
    assert metrics["AP-cat@0.7"] == pytest.approx(50.0)
    assert metrics["AP-dog@0.7"] == pytest.approx(100.0)
    assert np.isnan(metrics["AP-bird@0.5"])
    assert metrics["mAP@0.5"] == pytest.approx(100.0)
    assert metrics["mAP@0.7"] == pytest.approx(75.0)

    written = json.loads((tmp_path / "mask_apr_results.json").read_text())
    assert written["metrics"]["mAP@0.7"] == pytest.approx(75.0)
    assert written["metrics"]["AP-bird@0.5"] is None
    assert [c["num_gt"] for c in written["classes"]] == [2, 1, 0]
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_evaluator_empty_predictions_and_subset(tiny_dataset):
    # distributed=True (default): comm.gather over a world of one.
    evaluator = MaskAPrEvaluator(tiny_dataset, coco_thresholds_mean=True)
    evaluator.reset()
    evaluator.process([{"image_id": 2}], [{"instances": make_instances(10, 10, [], [], [])}])
    metrics = evaluator.evaluate()["segm_mAPr"]
    # Only image 2 was processed: its cat counts, its crowd dog does not.
    assert metrics["AP-cat@0.5"] == 0.0 and np.isnan(metrics["AP-dog@0.5"])
    assert metrics["mAP@0.5"] == 0.0 and metrics["mAP@[0.5:0.95]"] == 0.0


def test_evaluator_rejects_unknown_images(tiny_dataset):
    evaluator = MaskAPrEvaluator(tiny_dataset, distributed=False)
    evaluator.process([{"image_id": 99}], [{"instances": make_instances(10, 10, [], [], [])}])
    with pytest.raises(KeyError, match="not in dataset"):
        evaluator.evaluate()
