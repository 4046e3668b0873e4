"""PASCAL VOC 2012 instance segmentation: SBD and VOC2012 loaders for Detectron2.

MNC's benchmark trains on SBD ``train`` and reports mAP^r on SBD ``val``
(VOC 2012 images, SBD instance masks). Expected layout under the datasets root
(``$DETECTRON2_DATASETS``, default ``./datasets``)::

    sbd/dataset/img/<id>.jpg
    sbd/dataset/inst/<id>.mat      GTinst: Segmentation (H, W) instance ids, Categories (N, 1) 1..20
    sbd/dataset/cls/<id>.mat       GTcls: Segmentation (H, W) class ids (read only when needed)
    sbd/dataset/{train,val}.txt
    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationObject/<id>.png   palette PNG: instance ids, 255 = void border
    VOC2012/SegmentationClass/<id>.png    palette PNG: class ids 1..20, 255 = void border
    VOC2012/ImageSets/Segmentation/{train,val}.txt

Instance id 0 is background and 255 is void in both; they never form an
instance. Each annotation carries the instance's bitmask as an RLE dict
(str counts), its tight XYWH box and a contiguous class id 0..19. Image size
is read from the label map, so loading never decodes a JPEG.
"""
import functools
import os
from typing import Callable, Dict, List, Optional

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES
from detectron2.structures import BoxMode

from .common import register_dataset

__all__ = [
    "VOC_CLASSES",
    "load_sbd_instances",
    "load_voc_seg_instances",
    "register_all_voc_sbd",
    "register_voc_sbd",
]

BACKGROUND_ID, VOID_ID = 0, 255

SBD_SUBDIR = os.path.join("sbd", "dataset")
VOC_SUBDIR = "VOC2012"

SBD_LAYOUT = "sbd/dataset/{img/<id>.jpg, inst/<id>.mat, cls/<id>.mat, train.txt, val.txt}"
VOC_LAYOUT = (
    "VOC2012/{JPEGImages/<id>.jpg, SegmentationObject/<id>.png, SegmentationClass/<id>.png, "
    "ImageSets/Segmentation/{train,val}.txt}"
)

# name -> (source, split); source picks the loader and the folder under the root.
_PREDEFINED_SPLITS = {
    "sbd_2012_train": ("sbd", "train"),
    "sbd_2012_val": ("sbd", "val"),
    "voc_2012_seg_train": ("voc", "train"),
    "voc_2012_seg_val": ("voc", "val"),
}


# ----------------------------------------------------------------- pure helpers


def instance_annotations(
    instance_map: np.ndarray, class_of: Callable[[int, np.ndarray], int]
) -> List[dict]:
    """One D2 annotation per instance id of a label map.

    Args:
        instance_map: (H, W) integer instance ids; 0 = background, 255 = void.
        class_of: (instance_id, (H, W) bool mask) -> VOC class 1..20, or 0 to drop it.
    Returns:
        annotations with contiguous category_id 0..19, RLE segmentation, XYWH_ABS box.
    """
    annotations = []
    for instance_id in np.unique(instance_map):
        if instance_id in (BACKGROUND_ID, VOID_ID):
            continue
        mask = instance_map == instance_id  # (H, W)
        voc_class = int(class_of(int(instance_id), mask))
        if voc_class == 0:
            continue
        if not 1 <= voc_class <= len(VOC_CLASSES):
            raise ValueError(
                f"Instance {instance_id} has class {voc_class}, expected 1..{len(VOC_CLASSES)}"
            )
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        bbox = mask_util.toBbox(rle).tolist()  # [x, y, w, h], w = last column - first + 1
        rle["counts"] = rle["counts"].decode("utf-8")
        annotations.append(
            {
                "bbox": bbox,
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": voc_class - 1,
                "segmentation": rle,
                "iscrowd": 0,
            }
        )
    return annotations


def majority_class(class_map: np.ndarray, mask: np.ndarray) -> int:
    """Most frequent class 1..20 of `class_map` under `mask`; 0 if there is none."""
    values = class_map[mask].astype(np.int64)
    values = values[(values != BACKGROUND_ID) & (values != VOID_ID)]
    return int(np.bincount(values).argmax()) if values.size else 0


def read_sbd_mat(path: str, struct_name: str) -> Dict[str, np.ndarray]:
    """Fields of SBD's 1x1 MATLAB struct (``GTinst`` or ``GTcls``)."""
    import scipy.io  # here, not at import: only SBD's .mat files need scipy (a GPU machine may lack it)

    struct = scipy.io.loadmat(path)[struct_name][0, 0]
    return {name: struct[name] for name in struct.dtype.names}


def read_label_png(path: str) -> np.ndarray:
    """(H, W) uint8 palette indices of a VOC label PNG (never converted to RGB)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: expected a palette (P) or grey (L) PNG, got mode {image.mode}"
            )
        return np.array(image, dtype=np.uint8)


def read_split(path: str) -> List[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _require(path: str, dataset_name: str, root_hint: str, layout: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Dataset '{dataset_name}': {os.path.abspath(path)} does not exist. "
            f"Datasets are looked up under {root_hint}; set the environment variable "
            f"DETECTRON2_DATASETS to the directory that holds them (default: ./datasets), "
            f"laid out as $DETECTRON2_DATASETS/{layout}"
        )


# ---------------------------------------------------------------------- loaders


def load_sbd_instances(
    dataset_dir: str, split: str, dataset_name: Optional[str] = None
) -> List[dict]:
    """SBD (``<root>/sbd/dataset``) -> D2 dataset dicts with instance masks.

    An instance's class is ``GTinst.Categories[id - 1]``; if that entry is
    missing, the majority class of ``GTcls.Segmentation`` over its pixels.
    """
    name = dataset_name or f"sbd_2012_{split}"
    root_hint = os.path.abspath(os.path.join(dataset_dir, os.pardir, os.pardir))
    split_file = os.path.join(dataset_dir, f"{split}.txt")
    _require(split_file, name, root_hint, SBD_LAYOUT)
    dataset_dicts = []
    for image_id in read_split(split_file):
        inst_path = os.path.join(dataset_dir, "inst", f"{image_id}.mat")
        _require(inst_path, name, root_hint, SBD_LAYOUT)
        gt_inst = read_sbd_mat(inst_path, "GTinst")
        instance_map = np.asarray(gt_inst["Segmentation"])  # (H, W)
        categories = (
            np.asarray(gt_inst.get("Categories", np.zeros(0))).astype(np.int64).ravel()
        )  # (N,)
        cls_path = os.path.join(dataset_dir, "cls", f"{image_id}.mat")
        class_maps = []  # GTcls is read only if some instance lacks a category

        def class_of(instance_id: int, mask: np.ndarray) -> int:
            if instance_id <= len(categories):
                return int(categories[instance_id - 1])
            if not class_maps:
                _require(cls_path, name, root_hint, SBD_LAYOUT)
                class_maps.append(np.asarray(read_sbd_mat(cls_path, "GTcls")["Segmentation"]))
            return majority_class(class_maps[0], mask)

        height, width = instance_map.shape
        dataset_dicts.append(
            {
                "file_name": os.path.join(dataset_dir, "img", f"{image_id}.jpg"),
                "image_id": image_id,
                "height": int(height),
                "width": int(width),
                "annotations": instance_annotations(instance_map, class_of),
            }
        )
    return dataset_dicts


def load_voc_seg_instances(
    dataset_dir: str, split: str, dataset_name: Optional[str] = None
) -> List[dict]:
    """VOC2012 (``<root>/VOC2012``) SegmentationObject -> D2 dataset dicts.

    An object's class is the majority SegmentationClass value over its pixels
    (void and background excluded); objects without one are dropped.
    """
    name = dataset_name or f"voc_2012_seg_{split}"
    root_hint = os.path.abspath(os.path.join(dataset_dir, os.pardir))
    split_file = os.path.join(dataset_dir, "ImageSets", "Segmentation", f"{split}.txt")
    _require(split_file, name, root_hint, VOC_LAYOUT)
    dataset_dicts = []
    for image_id in read_split(split_file):
        object_path = os.path.join(dataset_dir, "SegmentationObject", f"{image_id}.png")
        class_path = os.path.join(dataset_dir, "SegmentationClass", f"{image_id}.png")
        _require(object_path, name, root_hint, VOC_LAYOUT)
        _require(class_path, name, root_hint, VOC_LAYOUT)
        instance_map = read_label_png(object_path)  # (H, W)
        class_map = read_label_png(class_path)  # (H, W)
        if instance_map.shape != class_map.shape:
            raise ValueError(
                f"{image_id}: SegmentationObject {instance_map.shape} "
                f"!= SegmentationClass {class_map.shape}"
            )
        height, width = instance_map.shape
        dataset_dicts.append(
            {
                "file_name": os.path.join(dataset_dir, "JPEGImages", f"{image_id}.jpg"),
                "image_id": image_id,
                "height": int(height),
                "width": int(width),
                "annotations": instance_annotations(
                    instance_map,
                    lambda _, mask, class_map=class_map: majority_class(class_map, mask),
                ),
            }
        )
    return dataset_dicts


# ------------------------------------------------------------------ registration


def _default_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_voc_sbd(name: str, dirname: str, source: str, split: str) -> None:
    """Register one split lazily (nothing is read until DatasetCatalog.get).

    Re-registering a name with the same folder is a no-op; with another
    folder it replaces the old entry (with a warning), so the last call wins.
    """
    if source not in ("sbd", "voc"):
        raise ValueError(f"source must be 'sbd' or 'voc', got {source!r}")
    loader = load_sbd_instances if source == "sbd" else load_voc_seg_instances
    register_dataset(
        name,
        functools.partial(loader, dirname, split, name),
        "dirname",
        dirname,
        thing_classes=list(VOC_CLASSES),
        evaluator_type="mapr",  # the trainer maps this to MaskAPrEvaluator
        split=split,
        year=2012,
        source=source,
    )


def register_all_voc_sbd(root: Optional[str] = None) -> None:
    """Register sbd_2012_{train,val} and voc_2012_seg_{train,val} under `root`.

    Args:
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` (default
            ``datasets``) at call time. Does not touch the disk.
    """
    root = _default_root() if root is None else os.path.expanduser(root)
    for name, (source, split) in _PREDEFINED_SPLITS.items():
        subdir = SBD_SUBDIR if source == "sbd" else VOC_SUBDIR
        register_voc_sbd(name, os.path.join(root, subdir), source, split)
