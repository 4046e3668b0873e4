"""A DatasetMapper that survives bad images and bad annotations.

D2 0.6's ``DatasetMapper`` lets a missing or truncated image end training with a PIL traceback,
saturates 16-bit images to white, reports a size mismatch without the file's two sizes in a form a
user can act on, and crashes deep inside ``PolygonMasks`` / ``mask_util`` on a malformed polygon or
RLE. :class:`RobustDatasetMapper` changes only that:

* images: :func:`read_image` names the file in every error; 16-bit (and 32-bit integer / float)
  grayscale is scaled to 8 bit, grayscale / palette / RGBA / CMYK are converted to the model's
  ``INPUT.FORMAT`` (RGBA loses its alpha channel). In training, an image that cannot be used is
  skipped (logged with its path and a running count; D2's ``MapDataset`` / our training stream
  then draw another image) or raises, per ``MNC_RELIABILITY.BAD_TRAIN_IMAGE``; in evaluation it
  always raises (a result over a silently smaller set would be wrong).
* annotations: malformed ones (a bbox that is not 4 finite numbers, no polygon with >= 3 points,
  an RLE of another size or that does not decode, an unsupported segmentation type) are dropped
  with a warning naming the file; degenerate ones (zero area, outside the image) are removed after
  the transform by D2's ``filter_empty_instances`` as before. Category ids are checked once, when the
  dataset is loaded (:mod:`mnc_d2.data.validation`). The output ``Instances`` has finite boxes inside the image, non-empty boxes
  and masks, and masks of the image's size.
"""
import copy
import logging

import numpy as np
import torch
from pycocotools import mask as mask_util

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n

from ..utils.errors import BadImageError, DatasetError, ImageSizeMismatchError
from .image_io import read_image

__all__ = ["RobustDatasetMapper", "read_image", "check_image_size", "sanitize_annotation"]

logger = logging.getLogger(__name__)

# Training stops when this many images IN A ROW cannot be read: the dataset (or its image root) is
# broken, and D2's MapDataset would otherwise retry other images forever.
MAX_CONSECUTIVE_BAD_IMAGES = 20

_SUPPORTED_BOX_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)


def check_image_size(dataset_dict: dict, image: np.ndarray) -> None:
    """D2's ``check_image_size`` raising :class:`ImageSizeMismatchError` with the file and both sizes."""
    height, width = image.shape[:2]
    expected = (dataset_dict.get("width", width), dataset_dict.get("height", height))
    if (width, height) != tuple(expected):
        file_name = dataset_dict.get("file_name", "<no file_name>")
        raise ImageSizeMismatchError(
            f"Image file {file_name} is {width}x{height} (WxH) but its annotation says "
            f"{expected[0]}x{expected[1]}: fix the 'width'/'height' of this image in the annotation file, "
            "or the image (an EXIF rotation can also swap the two).",
            file_name,
        )
    dataset_dict.setdefault("width", width)
    dataset_dict.setdefault("height", height)


def _valid_polygons(segmentation):
    """Polygons (flat x, y lists) with >= 3 points, an even number of finite coordinates."""
    polygons = []
    for polygon in segmentation:
        try:
            coords = np.asarray(polygon, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            continue
        if coords.size >= 6 and coords.size % 2 == 0 and np.isfinite(coords).all():
            polygons.append(coords)
    return polygons


def _valid_rle(rle, image_hw):
    """A compressed RLE of the image's size that decodes, or None."""
    size = rle.get("size")
    counts = rle.get("counts")
    try:
        if size is None or [int(v) for v in size] != list(image_hw):
            return None
        if isinstance(counts, list):  # uncompressed RLE: compress (D2 only decodes compressed ones)
            rle = mask_util.frPyObjects(rle, *image_hw)
        elif not isinstance(counts, (str, bytes)):
            return None
        if mask_util.decode(rle).shape[:2] != tuple(image_hw):
            return None
    except Exception:  # pycocotools raises assorted errors on garbage counts
        return None
    return rle


def sanitize_annotation(annotation: dict, image_hw, use_instance_mask: bool = True, mask_format: str = "bitmask"):
    """Check one annotation of an image of size ``image_hw`` (H, W) before D2 transforms it.

    Returns:
        (dict, None) with a cleaned copy (bbox as 4 floats, valid polygons, compressed RLE), or
        (None, reason) when the annotation is malformed and must be dropped.

    Raises:
        DatasetError: an RLE mask with ``mask_format="polygon"`` (a config mismatch, for every image).
    """
    annotation = dict(annotation)
    try:
        box = np.asarray(annotation.get("bbox"), dtype=np.float64).reshape(4)
    except (TypeError, ValueError):
        return None, f"bbox {annotation.get('bbox')!r} is not 4 numbers"
    if not np.isfinite(box).all():
        return None, f"bbox {box.tolist()} is not finite"
    if annotation.get("bbox_mode") not in _SUPPORTED_BOX_MODES:
        return None, f"bbox_mode {annotation.get('bbox_mode')!r} is not XYXY_ABS or XYWH_ABS"
    width, height = (box[2], box[3]) if annotation["bbox_mode"] == BoxMode.XYWH_ABS else (box[2] - box[0], box[3] - box[1])
    if width < 0 or height < 0:  # D2 would clip it into another, wrong box with no warning
        return None, f"bbox {box.tolist()} has a negative width or height"
    annotation["bbox"] = box.tolist()

    if not use_instance_mask:
        annotation.pop("segmentation", None)
    elif "segmentation" not in annotation:
        return None, "no segmentation (MODEL.MASK_ON needs a mask for every instance)"
    else:
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):
            polygons = _valid_polygons(segmentation)
            if not polygons:
                return None, "no polygon with >= 3 points of finite coordinates"
            annotation["segmentation"] = polygons
        elif isinstance(segmentation, dict):
            if mask_format == "polygon":
                raise DatasetError("The dataset has RLE masks, which INPUT.MASK_FORMAT 'polygon' cannot hold: "
                                   "set INPUT.MASK_FORMAT bitmask.")
            rle = _valid_rle(segmentation, image_hw)
            if rle is None:
                return None, f"RLE of size {segmentation.get('size')} does not decode to the image size {list(image_hw)}"
            annotation["segmentation"] = rle
        else:
            return None, f"segmentation of type {type(segmentation).__name__} (expected polygons or RLE)"
    return annotation, None


class RobustDatasetMapper(DatasetMapper):
    """D2's DatasetMapper with the error handling described in this module's docstring.

    Attributes:
        num_skipped_images (int): training images skipped so far by this copy of the mapper (each
            DataLoader worker has its own copy).
        num_dropped_annotations (int): malformed annotations dropped so far.
    """

    @configurable
    def __init__(self, is_train: bool, *, bad_image: str = "skip", max_image_pixels: int = 20_000_000, **kwargs):
        """
        Args:
            is_train, kwargs: see D2's DatasetMapper.
            bad_image: "skip" or "raise": what training does with an image that cannot be used.
        """
        super().__init__(is_train, **kwargs)
        if bad_image not in ("skip", "raise"):
            raise ValueError(f"bad_image must be 'skip' or 'raise', got {bad_image!r}")
        self.bad_image = bad_image
        self.max_image_pixels = max_image_pixels
        self.num_skipped_images = 0
        self.num_dropped_annotations = 0
        self._consecutive_bad = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["bad_image"] = cfg.MNC_RELIABILITY.BAD_TRAIN_IMAGE
        ret["max_image_pixels"] = cfg.MNC_RELIABILITY.MAX_IMAGE_PIXELS
        return ret

    def read_image(self, dataset_dict: dict) -> np.ndarray:
        """The image of ``dataset_dict`` in ``self.image_format`` (override to read from elsewhere)."""
        return read_image(dataset_dict["file_name"], format=self.image_format, max_pixels=self.max_image_pixels)

    def __call__(self, dataset_dict):
        """Like D2's; returns None (skip) for an unusable training image when ``bad_image == "skip"``."""
        try:
            result = self._map(dataset_dict)
        except BadImageError as e:
            if not (self.is_train and self.bad_image == "skip"):
                raise
            self._skip(e)
            return None
        self._consecutive_bad = 0
        return result

    def _skip(self, error: BadImageError) -> None:
        self.num_skipped_images += 1
        self._consecutive_bad += 1
        logger.warning(f"Skipping training image: {error} [{self.num_skipped_images} skipped so far in this process]")
        if torch.utils.data.get_worker_info() is None:  # main process: count it in metrics.json
            try:
                from detectron2.utils.events import get_event_storage

                get_event_storage().put_scalar("data/skipped_images", self.num_skipped_images, smoothing_hint=False)
            except AssertionError:  # no EventStorage (mapper used outside a trainer)
                pass
        if self._consecutive_bad >= MAX_CONSECUTIVE_BAD_IMAGES:
            raise BadImageError(
                f"{self._consecutive_bad} training images in a row could not be used (the last: {error}). "
                "Check the dataset's image directory and files.",
                error.file_name,
            ) from error

    def _map(self, dataset_dict):
        # D2 0.6's DatasetMapper.__call__, with read_image / check_image_size replaced (they are module
        # functions there, so they cannot be overridden alone). Semantic segmentation is not used by MNC.
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self.read_image(dataset_dict)
        check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # h, w
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict

        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        file_name = dataset_dict.get("file_name", "<in-memory image>")
        image_hw = (dataset_dict["height"], dataset_dict["width"])
        kept, reasons = [], []
        for index, annotation in enumerate(dataset_dict["annotations"]):
            if annotation.get("iscrowd", 0) != 0:
                continue  # D2 drops crowd regions from training targets too
            cleaned, reason = sanitize_annotation(annotation, image_hw, self.use_instance_mask,
                                                  self.instance_mask_format)
            if cleaned is None:
                reasons.append(f"#{index}: {reason}")
            else:
                kept.append(cleaned)
        if reasons:
            self.num_dropped_annotations += len(reasons)
            log_first_n(
                logging.WARNING,
                f"Image {file_name}: dropped {len(reasons)} malformed annotation(s): {'; '.join(reasons)} "
                f"[{self.num_dropped_annotations} dropped so far in this process; only the first warnings are shown]",
                n=20,
                name=__name__,
            )
        dataset_dict["annotations"] = kept
        super()._transform_annotations(dataset_dict, transforms, image_shape)
