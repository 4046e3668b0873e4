"""Reading images, by one rule for every entry point (training, evaluation, the demo, export): 16-bit (and 32-bit
integer / float) grayscale is scaled to 8 bit by each image's [1, 99.8] percentile range; errors name the file."""
from typing import Tuple

import numpy as np
from PIL import Image

from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

from ..utils.errors import CorruptImageError, ImageNotFoundError

__all__ = ["DEFAULT_PERCENTILES", "normalize_to_uint8", "read_image"]

DEFAULT_PERCENTILES = (1.0, 99.8)


def normalize_to_uint8(
    image: np.ndarray, percentiles: Tuple[float, float] = DEFAULT_PERCENTILES
) -> np.ndarray:
    """
    (H, W) or (H, W, C) array -> uint8 of the same shape. uint8 input is returned
    as it is; otherwise each channel is mapped linearly from its
    [P_low, P_high] percentile range to [0, 255] and clipped.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    image = image.astype(np.float32)
    channels = image[..., None] if image.ndim == 2 else image
    out = np.empty(channels.shape, dtype=np.uint8)
    for c in range(channels.shape[-1]):
        channel = channels[..., c]
        low, high = np.percentile(channel, percentiles)
        if high <= low:
            out[..., c] = 0
            continue
        scaled = (channel - low) * (255.0 / (high - low))
        out[..., c] = np.rint(np.clip(scaled, 0, 255))
    return out[..., 0] if image.ndim == 2 else out


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grayscale -> 8-bit "L" by the project's one rule,
    :func:`~mnc_d2.data.datasets.label_images.normalize_to_uint8` (each image's [1, 99.8] percentile range to 0..255,
    the rule that made the HeLa training crops). PIL's own convert clips at 255 (nearly every pixel of a
    16-bit image would be white), and a fixed 65535 -> 255 scaling turns microscopy frames (values
    33000-37000) flat grey."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    array = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return Image.fromarray(normalize_to_uint8(array), mode="L")


DEFAULT_MAX_PIXELS = 20_000_000  # MNC_RELIABILITY.MAX_IMAGE_PIXELS


def read_image(file_name: str, format=None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """D2's ``read_image`` (EXIF orientation, conversion to ``format``) with errors that name the file:
    :class:`ImageNotFoundError` (no such file) or :class:`CorruptImageError` (cannot be decoded,
    including truncated files, which PIL only notices when decoding, or more than ``max_pixels`` pixels,
    read from the header before decoding)."""
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            if max_pixels and image.width * image.height > max_pixels:
                raise CorruptImageError(
                    f"Image file {file_name} is {image.width}x{image.height} pixels, more than "
                    f"MNC_RELIABILITY.MAX_IMAGE_PIXELS={max_pixels}; it was not decoded.", file_name)
            image.load()  # decode now, inside the try: a truncated file fails here, not later
    except CorruptImageError:
        raise
    except FileNotFoundError as e:
        raise ImageNotFoundError(f"Image file {file_name} does not exist.", file_name) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(
            f"Image file {file_name} cannot be decoded ({type(e).__name__}: {e}); it may be truncated or not an image.",
            file_name,
        ) from e
    image = utils._apply_exif_orientation(image)
    return utils.convert_PIL_to_numpy(_to_8bit(image), format)
