"""Load and check the dataset dicts of a training or test set before any image is read.

D2 0.6's ``get_detection_dataset_dicts`` lets a malformed COCO json fail deep in pycocotools
(``KeyError: 'images'``), reports an empty dataset with an ``AssertionError`` and never looks at
the records. :func:`load_dataset_dicts` does the same job with D2's own steps (``DatasetCatalog.get``,
``filter_images_with_only_crowd_annotations``, ``check_metadata_consistency``,
``print_instances_class_histogram``) and raises :class:`DatasetError` naming the dataset, the file
and the key:

* the loader fails: the error names the COCO json (``metadata.json_file``) and, for a bad top level,
  :func:`diagnose_coco_json` says what is wrong;
* a dataset is empty, or nothing is left after ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``;
* a record lacks ``file_name`` / has a bad ``height`` / ``width`` / ``annotations``, an
  annotation lacks ``bbox`` / ``bbox_mode`` / ``category_id``, or a category id is outside
  ``[0, NUM_CLASSES)``;
* image files are missing: training drops them with one warning listing them
  (``MNC_RELIABILITY.BAD_TRAIN_IMAGE: "skip"``) or raises; evaluation raises.

Geometric problems of single annotations (zero area, outside the image, degenerate polygons) are
not errors: :class:`~mnc_d2.data.mapper.RobustDatasetMapper` drops them per image.
"""
import itertools
import json
import logging
import numbers
import os
from typing import List, Optional, Sequence

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import (
    check_metadata_consistency,
    filter_images_with_only_crowd_annotations,
    print_instances_class_histogram,
)

from ..utils.errors import DatasetError, MNCError

__all__ = ["load_dataset_dicts", "load_dataset", "diagnose_coco_json", "validate_dataset_dicts", "drop_missing_images"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 10  # file names listed in one message


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def diagnose_coco_json(json_file: str) -> Optional[str]:
    """A problem of a COCO json's top level that pycocotools loads as an empty dataset or fails on without
    naming (``"<what>"``), or None. Errors inside the records are D2's ``load_coco_json``'s and
    :func:`validate_dataset_dicts`'."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not valid JSON ({e})" if isinstance(e, json.JSONDecodeError) else f"cannot be read ({e})"
    if not isinstance(data, dict):
        return f"the top level must be an object with 'images', 'annotations' and 'categories', got {type(data).__name__}"
    for key in ("images", "annotations", "categories"):
        if key not in data and key != "annotations":
            return f"missing top-level key {key!r}"
        if key in data and not isinstance(data[key], list):
            return f"top-level key {key!r} must be a list, got {type(data[key]).__name__}"
    return None


def load_dataset(name: str) -> list:
    """``DatasetCatalog.get(name)``, raising :class:`DatasetError` that names the dataset (and its
    json file and the bad key, for COCO-json datasets) instead of the loader's traceback."""
    if name not in DatasetCatalog.list():
        raise DatasetError(
            f"Dataset {name!r} is not registered (check DATASETS.TRAIN / DATASETS.TEST). "
            f"Registered: {', '.join(sorted(DatasetCatalog.list()))}"
        )
    json_file = MetadataCatalog.get(name).get("json_file")
    try:
        dicts = DatasetCatalog.get(name)
    except MNCError:
        raise
    except Exception as e:
        if json_file:
            problem = diagnose_coco_json(json_file) or f"{type(e).__name__}: {e}"
            raise DatasetError(f"Dataset {name!r}: cannot load COCO json {json_file}: {problem}") from e
        raise DatasetError(f"Dataset {name!r}: its loader failed: {type(e).__name__}: {e}") from e
    if not isinstance(dicts, list):
        raise DatasetError(f"Dataset {name!r}: its loader returned a {type(dicts).__name__}, not a list of dicts")
    if not dicts:  # D2's get_detection_dataset_dicts asserts this; we say why
        problem = diagnose_coco_json(json_file) if json_file else None
        if problem:  # e.g. no 'images' key: pycocotools then loads an empty dataset without complaint
            raise DatasetError(f"Dataset {name!r}: cannot load COCO json {json_file}: {problem}")
        source = f" (from {json_file})" if json_file else ""
        raise DatasetError(f"Dataset {name!r} has no images{source}.")
    return dicts


def validate_dataset_dicts(name: str, dicts: Sequence[dict], num_classes: Optional[int] = None) -> None:
    """Raise :class:`DatasetError` on the first record that D2's mapper could not use (see module doc)."""
    json_file = MetadataCatalog.get(name).get("json_file")
    source = f"Dataset {name!r}" + (f" ({json_file})" if json_file else "")
    for i, record in enumerate(dicts):
        if not isinstance(record, dict):
            raise DatasetError(f"{source}: record {i} is a {type(record).__name__}, not a dict")
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DatasetError(f"{source}: record {i} has no 'file_name' (got {_describe(file_name)})")
        for key in ("height", "width"):
            if key in record and not (_is_int(record[key]) and record[key] > 0):
                raise DatasetError(f"{source}: image {file_name}: {key!r} must be a positive integer, got {_describe(record[key])}")
        annotations = record.get("annotations", [])
        if not isinstance(annotations, list):
            raise DatasetError(f"{source}: image {file_name}: 'annotations' must be a list, got {_describe(annotations)}")
        for j, annotation in enumerate(annotations):
            where = f"{source}: image {file_name}, annotation #{j}"
            if not isinstance(annotation, dict):
                raise DatasetError(f"{where} is a {type(annotation).__name__}, not a dict")
            for key in ("bbox", "bbox_mode", "category_id"):
                if key not in annotation:
                    raise DatasetError(f"{where}: missing key {key!r}")
            bbox = annotation["bbox"]
            if not (isinstance(bbox, (list, tuple, np.ndarray)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise DatasetError(f"{where}: key 'bbox' must be 4 numbers, got {_describe(bbox)}")
            category_id = annotation["category_id"]
            if not _is_int(category_id) or (num_classes is not None and not 0 <= category_id < num_classes):
                limit = f" in [0, {num_classes}) (MODEL.ROI_HEADS.NUM_CLASSES)" if num_classes is not None else ""
                raise DatasetError(f"{where}: category_id {category_id!r} is not a class id{limit}")


def drop_missing_images(name: str, dicts: List[dict], *, raise_error: bool) -> List[dict]:
    """Drop records whose local image file does not exist (one warning listing them), or raise."""
    missing = [d["file_name"] for d in dicts if "://" not in d["file_name"] and not os.path.isfile(d["file_name"])]
    if not missing:
        return dicts
    listed = ", ".join(missing[:_MAX_LISTED]) + (" ..." if len(missing) > _MAX_LISTED else "")
    message = f"Dataset {name!r}: {len(missing)} of {len(dicts)} image files do not exist: {listed}"
    if raise_error or len(missing) == len(dicts):
        hint = " Is the dataset's image root right?" if len(missing) == len(dicts) else ""
        raise DatasetError(message + hint)
    logger.warning(message + ". They are skipped (MNC_RELIABILITY.BAD_TRAIN_IMAGE: skip).")
    missing = set(missing)
    return [d for d in dicts if d["file_name"] not in missing]


def check_image_headers(name: str, dicts: Sequence[dict]) -> None:
    """A test set's images, from their headers only: each must be an image of its record's size (an evaluation on
    a silently smaller set would be wrong, so this runs before training, not after it)."""
    from PIL import Image

    for record in dicts:
        file_name = record["file_name"]
        if "://" in file_name:
            continue
        try:
            with Image.open(file_name) as image:
                size = image.size
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"Dataset {name!r}: image {file_name} cannot be read ({type(e).__name__}: {e})") from None
        expected = (record.get("width", size[0]), record.get("height", size[1]))
        if size != expected and size[::-1] != expected:  # an EXIF rotation may swap them
            raise DatasetError(f"Dataset {name!r}: image {file_name} is {size[0]}x{size[1]} (WxH) but its record says "
                               f"{expected[0]}x{expected[1]}")


def load_dataset_dicts(
    names: Sequence[str],
    *,
    is_train: bool,
    filter_empty: bool = True,
    num_classes: Optional[int] = None,
    bad_image: str = "skip",
    require_masks: bool = False,
) -> List[dict]:
    """D2's ``get_detection_dataset_dicts`` for a training (``is_train``) or test set, with the checks
    of this module (and without its proposal files and keypoint filter, which MNC does not use).

    Args:
        names: dataset names (``DATASETS.TRAIN``, or one test set).
        filter_empty: drop images without (non-crowd) annotations (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``);
            training only.
        num_classes: category ids must lie in [0, num_classes) (``MODEL.ROI_HEADS.NUM_CLASSES``).
        bad_image: "skip" drops missing training images with a warning, "raise" raises. Test sets
            always raise.
        require_masks: (training, ``MODEL.MASK_ON``) raise if no annotation has a ``segmentation``.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise DatasetError(f"No dataset given ({'DATASETS.TRAIN' if is_train else 'DATASETS.TEST'} is empty).")
    per_dataset = []
    for name in names:
        dicts = load_dataset(name)
        validate_dataset_dicts(name, dicts, num_classes)
        per_dataset.append(drop_missing_images(name, dicts, raise_error=not is_train or bad_image == "raise"))
        if not is_train:
            check_image_headers(name, per_dataset[-1])
    dicts = list(itertools.chain.from_iterable(per_dataset))

    if is_train and require_masks and not any("segmentation" in a for d in dicts for a in d.get("annotations", [])):
        raise DatasetError(f"MODEL.MASK_ON is True but no annotation of {list(names)} has a 'segmentation' (MNC "
                           "trains on instance masks).")

    # The rest is D2's get_detection_dataset_dicts, with a DatasetError in place of its final assert.
    has_instances = "annotations" in dicts[0]
    if is_train and filter_empty and has_instances:
        before = len(dicts)
        dicts = filter_images_with_only_crowd_annotations(dicts)
        if not dicts:
            raise DatasetError(
                f"None of the {before} training images of {list(names)} has a (non-crowd) annotation. "
                "Set DATALOADER.FILTER_EMPTY_ANNOTATIONS False to train on images without annotations."
            )
    if has_instances:
        try:
            class_names = MetadataCatalog.get(names[0]).thing_classes
            check_metadata_consistency("thing_classes", names)
            print_instances_class_histogram(dicts, class_names)
        except AttributeError:  # class names are not available for this dataset
            pass
    return dicts
