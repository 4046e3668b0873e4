"""
Instance segmentation datasets from "images + instance label images".

A label image is an integer array of the image's height and width where 0 is
background and every positive value marks the pixels of one instance (the
format of the Cell Tracking Challenge, StarDist, Cellpose, ...). This module
turns such pairs into Detectron2 dataset dicts:

    {"file_name", "height", "width", "image_id",
     "annotations": [{"bbox" (XYXY_ABS), "bbox_mode", "category_id",
                      "segmentation" (COCO RLE dict, counts as str), "iscrowd": 0}]}

Masks are RLE dicts, so training configs must set ``INPUT.MASK_FORMAT "bitmask"``
(D2's default "polygon" cannot hold RLE). An instance whose pixels form several
connected components stays one instance. Registered datasets get
``evaluator_type="coco"``: D2's COCOEvaluator writes the COCO json itself
(``convert_to_coco_json`` handles RLE segmentation in D2 0.6, the tests check it)
and caches it as ``<OUTPUT_DIR>/<name>_coco_format.json``; delete that file if the
data behind a dataset name changes.

Images for D2 must be files that ``detectron2.data.detection_utils.read_image``
reads as 8-bit. An image given as a file that is an 8-bit png/jpg/bmp (grey or
RGB) is referenced as it is. Every other image (a numpy array, a tif, a 16-bit
png, ...) is written as an 8-bit 3-channel PNG into ``converted_dir`` (default
``$MNC_D2_CACHE/converted``, ``MNC_D2_CACHE`` defaulting to ``~/.cache/mnc_d2``):

- uint8 values are kept;
- any other dtype is percentile-normalised per channel:
  ``v8 = round(255 * clip((v - P_low) / (P_high - P_low), 0, 1))`` with
  ``P_low, P_high`` the ``percentiles`` (default 1 and 99.8) of that channel of
  that image (a constant channel becomes 0);
- grey images are repeated to 3 channels, an alpha channel is dropped.
"""
import hashlib
import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..image_io import DEFAULT_PERCENTILES, normalize_to_uint8
from .common import cache_root, write_png_atomic

__all__ = [
    "cache_root",
    "label_image_to_annotations",
    "normalize_to_uint8",
    "read_image_array",
    "read_label_image",
    "load_label_image_pairs",
    "register_label_image_dataset",
    "write_png_atomic",
]

ImageLike = Union[str, os.PathLike, np.ndarray]

_TIFF_SUFFIXES = (".tif", ".tiff")
# Files D2's read_image (PIL) decodes correctly when they hold 8-bit data.
_D2_READABLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def label_image_to_annotations(
    label: np.ndarray,
    category_id: int = 0,
    min_area: int = 1,
    label_to_category: Optional[Mapping[int, int]] = None,
) -> List[dict]:
    """
    Args:
        label: (H, W) integer array, 0 = background, each positive value = one instance.
            A float array is accepted if all its values are integers.
        category_id: contiguous class id given to every instance.
        min_area: instances with fewer pixels are dropped.
        label_to_category: optional {label value: category id}; overrides
            ``category_id`` and must cover every label value present.

    Returns:
        D2 annotation dicts ordered by label value, with a tight "bbox" in XYXY_ABS
        pixel-edge coordinates (a one-pixel instance at (x, y) has [x, y, x+1, y+1])
        and "segmentation" as a COCO RLE dict whose counts are a str.
    """
    label = _as_label_array(label)
    height, width = label.shape
    flat = label.ravel()
    pixel_index = np.flatnonzero(flat)
    values = flat[pixel_index]
    order = np.argsort(values, kind="stable")
    pixel_index, values = pixel_index[order], values[order]
    label_values, starts, areas = np.unique(values, return_index=True, return_counts=True)

    if label_to_category is not None:
        missing = [int(v) for v in label_values if int(v) not in label_to_category]
        if missing:
            raise ValueError(f"label_to_category has no class for label values {missing[:10]}")

    # One Fortran-ordered canvas reused for all instances: RLE needs a full-size mask.
    canvas = np.zeros((height, width), dtype=np.uint8, order="F")
    annotations = []
    for value, start, area in zip(label_values, starts, areas):
        if area < min_area:
            continue
        index = pixel_index[start : start + area]
        ys, xs = np.divmod(index, width)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        canvas[y0:y1, x0:x1] = label[y0:y1, x0:x1] == value
        rle = mask_util.encode(canvas)
        canvas[y0:y1, x0:x1] = 0
        rle["counts"] = rle["counts"].decode("ascii")
        cls = category_id if label_to_category is None else label_to_category[int(value)]
        annotations.append(
            {
                "bbox": [float(x0), float(y0), float(x1), float(y1)],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": int(cls),
                "segmentation": rle,
                "iscrowd": 0,
            }
        )
    return annotations


def _read_array(path: Union[str, os.PathLike], what: str, read_non_tiff) -> np.ndarray:
    """``what`` file at ``path`` as an array: tiffs by ``_read_tiff``, others by ``read_non_tiff(path)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    array = _read_tiff(path) if path.suffix.lower() in _TIFF_SUFFIXES else read_non_tiff(path)
    return _squeeze_leading(array, path)


def _read_with_cv2(path: Path) -> np.ndarray:
    # cv2 keeps 16-bit data (PIL reduces 16-bit colour to 8 bits).
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError(f"cannot decode image file: {path}")
    if array.ndim == 3 and array.shape[2] >= 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return array


def _read_with_pil(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def read_image_array(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file with its original bit depth: (H, W) or (H, W, C) in RGB order."""
    return _read_array(path, "image", _read_with_cv2)


def read_label_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a label image file as an (H, W) integer array (palette PNGs give their indices)."""
    array = _read_array(path, "label", _read_with_pil)
    if array.ndim != 2:
        raise ValueError(f"label image {path} must be 2-D (H, W), got shape {array.shape}")
    return array


def load_label_image_pairs(
    image_files: Sequence[ImageLike],
    label_files: Sequence[ImageLike],
    category_id: int = 0,
    min_area: int = 1,
    label_to_category: Optional[Sequence[Optional[Mapping[int, int]]]] = None,
    image_ids: Optional[Sequence[int]] = None,
    converted_dir: Optional[Union[str, os.PathLike]] = None,
    percentiles: Tuple[float, float] = DEFAULT_PERCENTILES,
) -> List[dict]:
    """
    Args:
        image_files: per image a file (png/jpg/tif, 8 or 16 bit, grey or RGB) or an
            (H, W) / (H, W, C) array.
        label_files: per image a label image file (png/tif) or an (H, W) integer array.
        category_id, min_area: see :func:`label_image_to_annotations`.
        label_to_category: optional per-image {label value: category id} (None entries
            fall back to ``category_id``).
        image_ids: default 0, 1, 2, ...
        converted_dir: where images that D2 cannot read as they are go as 8-bit RGB PNG
            (see the module docstring); default ``cache_root() / "converted"``.
        percentiles: (low, high) percentiles of the 8-bit conversion.

    Returns:
        one D2 dataset dict per image, in input order (images without instances included).
    """
    n = len(image_files)
    if len(label_files) != n:
        raise ValueError(f"got {n} images but {len(label_files)} label images; they must pair up")
    if label_to_category is not None and len(label_to_category) != n:
        raise ValueError(f"got {n} images but {len(label_to_category)} label_to_category entries")
    if image_ids is None:
        image_ids = range(n)
    elif len(image_ids) != n:
        raise ValueError(f"got {n} images but {len(image_ids)} image_ids")
    converted_dir = Path(converted_dir) if converted_dir is not None else cache_root() / "converted"

    dataset_dicts = []
    for index, (image, label, image_id) in enumerate(zip(image_files, label_files, image_ids)):
        label_name = _describe(label, "label", index)
        label_array = label if isinstance(label, np.ndarray) else read_label_image(label)
        label_array = _as_label_array(label_array, label_name)
        file_name, (height, width) = _d2_readable_image(image, index, converted_dir, percentiles)
        if (height, width) != label_array.shape:
            raise ValueError(
                f"size mismatch: image {_describe(image, 'image', index)} is {height}x{width} "
                "(HxW) "
                f"but label {label_name} is {label_array.shape[0]}x{label_array.shape[1]}"
            )
        mapping = None if label_to_category is None else label_to_category[index]
        try:
            annotations = label_image_to_annotations(label_array, category_id, min_area, mapping)
        except ValueError as e:
            raise ValueError(f"{label_name}: {e}") from e
        dataset_dicts.append(
            {
                "file_name": file_name,
                "height": height,
                "width": width,
                "image_id": int(image_id),
                "annotations": annotations,
            }
        )
    return dataset_dicts


def register_label_image_dataset(
    name: str,
    image_files: Sequence[ImageLike],
    label_files: Sequence[ImageLike],
    thing_classes: Sequence[str] = ("object",),
    **kwargs,
) -> None:
    """
    Register ``name`` in DatasetCatalog (loaded lazily by :func:`load_label_image_pairs`
    with ``kwargs``) and MetadataCatalog (``thing_classes``, ``evaluator_type="coco"``).
    The file lists are checked for equal length now; files are read on load.
    """
    if len(image_files) != len(label_files):
        raise ValueError(
            f"dataset {name!r}: got {len(image_files)} images but {len(label_files)} label images"
        )
    image_files, label_files = list(image_files), list(label_files)
    DatasetCatalog.register(
        name, lambda: load_label_image_pairs(image_files, label_files, **kwargs)
    )
    MetadataCatalog.get(name).set(thing_classes=list(thing_classes), evaluator_type="coco")


def _as_label_array(label: np.ndarray, name: str = "label image") -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {label.shape}")
    if label.dtype == bool:
        raise ValueError(
            f"{name} is boolean; expected an instance label image "
            "(0 = background, k > 0 = instance k)"
        )
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.mod(label, 1) == 0):
            raise ValueError(f"{name} has non-integer values")
        label = label.astype(np.int64)
    elif not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{name} has dtype {label.dtype}; expected integers")
    if label.size and label.min() < 0:
        raise ValueError(f"{name} has negative values")
    return label


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import tifffile
    except ImportError as e:
        raise ImportError(f"reading {path} needs tifffile: pip install tifffile") from e
    return tifffile.imread(path)


def _squeeze_leading(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop leading singleton axes of (1, H, W)-style files; reject stacks."""
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim > 3 or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"{path} has shape {array.shape}; expected (H, W) or (H, W, C) with C in 1, 3, 4 "
            "(split stacks into one file or array per image)"
        )
    return array


def _describe(item: ImageLike, kind: str, index: int) -> str:
    if isinstance(item, np.ndarray):
        return f"{kind} array #{index}"
    return str(item)


def _d2_readable_image(
    image: ImageLike, index: int, converted_dir: Path, percentiles: Tuple[float, float]
) -> Tuple[str, Tuple[int, int]]:
    """(file name D2 reads as 8-bit RGB, (H, W)); converts into ``converted_dir`` if needed."""
    if isinstance(image, np.ndarray):
        array = image
        stem = f"array{index:05d}"
        source_key = (
            f"{hashlib.sha1(np.ascontiguousarray(image)).hexdigest()}|{image.shape}|{image.dtype}"
        )
    else:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        if path.suffix.lower() in _D2_READABLE_SUFFIXES:
            with Image.open(path) as header:  # reads the header only
                if header.mode in ("L", "RGB"):  # 8-bit grey / RGB: D2 reads it as it is
                    return str(path.resolve()), (header.height, header.width)
        array = None  # read only if the converted file is not there yet
        stat = path.stat()
        stem, source_key = path.stem, f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    digest = hashlib.sha1(f"{source_key}|{tuple(percentiles)}".encode()).hexdigest()[:12]
    target = converted_dir / f"{stem}_{digest}.png"
    if target.is_file():
        with Image.open(target) as header:
            return str(target.resolve()), (header.height, header.width)

    if array is None:
        array = read_image_array(path)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"{_describe(image, 'image', index)} has shape {array.shape}; "
            "expected (H, W) or (H, W, C)"
        )
    if array.ndim == 3:
        array = array[..., :3] if array.shape[2] >= 3 else array[..., 0]
    rgb = normalize_to_uint8(array, percentiles)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    write_png_atomic(target, rgb[..., ::-1])  # cv2 writes BGR
    return str(target.resolve()), rgb.shape[:2]

