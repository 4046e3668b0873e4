"""Detectron2 ``DatasetEvaluator`` for mAP^r (mask AP at IoU 0.5 / 0.7).

``process`` turns each image's predictions (``pred_masks``, ``pred_boxes``, ``scores``, ``pred_classes``)
into RLE results on the CPU with D2's ``instances_to_coco_json``; ``evaluate`` gathers them from all
workers, converts the dataset's GT (``DatasetCatalog.get(dataset_name)``) to
RLE and calls :func:`mnc_d2.evaluation.mask_ap.evaluate_mask_ap`.

Class ids: D2 dataset dicts and model outputs both use contiguous ids
0..K-1 (``load_coco_json`` already applies ``thing_dataset_id_to_contiguous_id``
to the dicts), so they are compared as they are; the mapping, when the
metadata has one, is only written to the result file next to each class.

Only images seen by ``process`` are evaluated, as D2's ``COCOEvaluator``
restricts COCOeval to the predicted image ids.
"""
import itertools
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm

from ..utils.file_io import atomic_write_json
from .mask_ap import ASSIGNMENTS, INTERPOLATIONS, evaluate_mask_ap

logger = logging.getLogger(__name__)

RESULTS_FILE = "mask_apr_results.json"


def annotation_to_rle(segmentation, height: Optional[int], width: Optional[int]) -> dict:
    """A D2 annotation's segmentation -> one RLE dict.

    Accepts what D2's ``annotations_to_instances`` accepts: a list of polygons,
    an RLE dict (compressed or uncompressed counts), or an (H, W) bitmask.
    """
    if isinstance(segmentation, list):
        if height is None or width is None:
            raise ValueError("Polygon ground truth needs the image's height and width")
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            h, w = segmentation["size"]
            rle = mask_util.frPyObjects(segmentation, h, w)
        else:
            rle = dict(segmentation)
    elif isinstance(segmentation, np.ndarray):
        rle = mask_util.encode(np.asfortranarray(segmentation.astype(np.uint8)))
    else:
        raise TypeError(f"Unsupported segmentation type {type(segmentation)}")
    if isinstance(rle["counts"], bytes):
        rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def dataset_dicts_to_ground_truths(dataset_dicts: Sequence[dict], image_ids=None) -> List[dict]:
    """D2 dataset dicts -> GT dicts for ``evaluate_mask_ap`` (contiguous ids kept).

    Args:
        image_ids: if given, only these images' annotations are converted.
    """
    wanted = None if image_ids is None else set(image_ids)
    ground_truths = []
    for record in dataset_dicts:
        if wanted is not None and record["image_id"] not in wanted:
            continue
        height, width = record.get("height"), record.get("width")
        for anno in record.get("annotations", []):
            if "segmentation" not in anno:
                raise KeyError(f"Image {record['image_id']}: an annotation has no 'segmentation'")
            ground_truths.append(
                {
                    "image_id": record["image_id"],
                    "category_id": int(anno["category_id"]),
                    "segmentation": annotation_to_rle(anno["segmentation"], height, width),
                    "iscrowd": int(anno.get("iscrowd", 0)),
                    "difficult": int(anno.get("difficult", 0)),
                }
            )
    return ground_truths


class MaskAPrEvaluator(DatasetEvaluator):
    """mAP^r of SDS / MNC: per-class mask AP at each IoU threshold.

    ``evaluate`` returns ``{"segm_mAPr": {"mAP@0.5", "mAP@0.7",
    "AP-<class>@0.5", ...}}`` in percent; ``"mAP@[0.5:0.95]"`` is added when
    ``coco_thresholds_mean=True``.
    """

    def __init__(
        self,
        dataset_name: str,
        iou_thresholds: Sequence[float] = (0.5, 0.7),
        output_dir: Optional[str] = None,
        distributed: bool = True,
        interpolation: str = "voc",
        assignment: str = "unmatched",
        coco_thresholds_mean: bool = False,
    ):
        """
        Args:
            dataset_name: a name registered in DatasetCatalog / MetadataCatalog
                with ``thing_classes``.
            iou_thresholds: mask-IoU thresholds reported one by one.
            output_dir: if set, results are written to ``<output_dir>/mask_apr_results.json``.
            distributed: gather predictions from all workers (D2 convention).
            interpolation: "voc" (default), "voc07" (what MNC / FCIS code
                report) or "coco101"; see ``mask_ap``.
            assignment: "unmatched" (default) or "argmax" (SDS / MNC).
            coco_thresholds_mean: also report the mean over IoU 0.5:0.05:0.95.
        """
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        self._dataset_name = dataset_name
        self._iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self._output_dir = output_dir
        self._distributed = distributed
        self._interpolation = interpolation
        self._assignment = assignment
        self._coco_thresholds_mean = coco_thresholds_mean
        self._metadata = MetadataCatalog.get(dataset_name)
        self._class_names = list(self._metadata.thing_classes)
        self._cpu_device = torch.device("cpu")
        self._predictions: List[dict] = []

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            prediction = {"image_id": input["image_id"], "instances": []}
            if "instances" in output:
                instances = output["instances"].to(self._cpu_device)
                if len(instances) and not instances.has("pred_masks"):
                    raise KeyError("MaskAPrEvaluator needs `instances.pred_masks` (image-sized binary masks)")
                prediction["instances"] = instances_to_coco_json(instances, input["image_id"])  # RLE masks
            self._predictions.append(prediction)

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if len(predictions) == 0:
            logger.warning("[MaskAPrEvaluator] Did not receive valid predictions.")
            return {}

        image_ids = [p["image_id"] for p in predictions]
        ground_truths = self._load_ground_truths(image_ids)
        instances = list(itertools.chain(*[p["instances"] for p in predictions]))
        results = evaluate_mask_ap(
            instances,
            ground_truths,
            num_classes=len(self._class_names),
            iou_thresholds=self._all_thresholds(),
            interpolation=self._interpolation,
            assignment=self._assignment,
        )
        metrics = self._metrics(results)
        logger.info(
            "mAP^r (%s interpolation) on %d images: %s",
            self._interpolation,
            len(image_ids),
            ", ".join(f"{k} = {v:.2f}" for k, v in metrics.items() if k.startswith("mAP")),
        )
        if self._output_dir:
            self._write_results(metrics, results)
        return OrderedDict({"segm_mAPr": metrics})

    def _all_thresholds(self) -> List[float]:
        thresholds = list(self._iou_thresholds)
        if self._coco_thresholds_mean:
            thresholds += [float(t) for t in np.linspace(0.5, 0.95, 10)]
        return thresholds

    def _load_ground_truths(self, image_ids) -> List[dict]:
        dataset_dicts = DatasetCatalog.get(self._dataset_name)
        known = {record["image_id"] for record in dataset_dicts}
        missing = set(image_ids) - known
        if missing:
            raise KeyError(
                f"{len(missing)} image ids from process() are not in dataset "
                f"'{self._dataset_name}', e.g. {sorted(map(str, missing))[:3]}"
            )
        return dataset_dicts_to_ground_truths(dataset_dicts, image_ids)

    def _metrics(self, results: Dict[str, np.ndarray]) -> "OrderedDict[str, float]":
        """Percent values; per-class AP is NaN for classes without GT (D2 convention)."""
        num_reported = len(self._iou_thresholds)
        metrics = OrderedDict()
        for t, threshold in enumerate(self._iou_thresholds):
            metrics[f"mAP@{threshold:g}"] = float(results["mean_ap"][t] * 100)
        if self._coco_thresholds_mean:
            metrics["mAP@[0.5:0.95]"] = float(np.mean(results["mean_ap"][num_reported:]) * 100)
        for t, threshold in enumerate(self._iou_thresholds):
            for k, name in enumerate(self._class_names):
                metrics[f"AP-{name}@{threshold:g}"] = float(
                    results["ap"][t, k] * 100
                )
        return metrics

    def _write_results(self, metrics, results) -> None:
        id_map = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        dataset_id_of = {v: k for k, v in id_map.items()} if id_map else {}
        payload = {
            "dataset": self._dataset_name,
            "interpolation": self._interpolation,
            "assignment": self._assignment,
            "iou_thresholds": [float(t) for t in results["iou_thresholds"]],
            "metrics": {k: _json_float(v) for k, v in metrics.items()},
            "classes": [
                {
                    "contiguous_id": k,
                    "dataset_id": dataset_id_of.get(k, k),
                    "name": name,
                    "num_gt": int(results["num_gt"][k]),
                    "ap": [_json_float(a * 100) for a in results["ap"][:, k]],
                }
                for k, name in enumerate(self._class_names)
            ],
        }
        path = os.path.join(self._output_dir, RESULTS_FILE)
        atomic_write_json(path, payload, indent=2)  # a reader never sees half a file
        logger.info("mAP^r results written to %s", path)


def _json_float(value: float):
    value = float(value)
    return None if np.isnan(value) else value
