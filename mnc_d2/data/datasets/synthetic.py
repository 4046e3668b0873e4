"""Synthetic "shapes" instance-segmentation dataset, written in COCO format.

The five classes are chosen so that boxes alone cannot tell them apart: a
``disc`` and a ``ring`` (or a ``square`` and a ``square_frame``) have the same
box and the same outline, only their masks differ. That is the case MNC's
mask-based cascade (masking the box features with the predicted mask) is
meant to win on.

Each image has a textured background (smooth low-frequency colour noise, maybe
stripes and a gradient, pixel noise) and 2-6 flat-coloured shapes drawn in
order, later ones on top. An instance's mask is its VISIBLE part: its own
shape minus everything drawn after it. Rather than drawing a heavily hidden
object and then dropping its label (which would leave unlabelled fragments in
the image), a new object is re-placed until every instance keeps at least
``MIN_VISIBLE_FRACTION`` of its area and ``MIN_VISIBLE_PIXELS`` pixels; an
object that cannot be placed that way is not drawn.

Layout on disk (one split)::

    <split>/images/000000.png ...      RGB
    <split>/annotations.json          COCO: RLE segmentation, XYWH bbox, 1-based category_id

A split directory only ever appears complete: it is written into a temporary
sibling directory (json last) that is then renamed into place.

CLI (regenerate at other sizes)::

    python -m mnc_d2.data.datasets.synthetic --out DIR --num-train 600 --num-val 100 --image-size 256 --seed 0
"""

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_util
from tqdm import tqdm

from .common import build_dir_atomically

__all__ = ["SHAPE_CLASSES", "GENERATOR_VERSION", "generate_image", "generate_split", "main"]

SHAPE_CLASSES = ("disc", "ring", "square", "square_frame", "triangle")
# Bump when the output for a given seed changes; it names the builtin cache directory.
GENERATOR_VERSION = "mnc_shapes_v1"
ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"

MIN_VISIBLE_FRACTION = 0.3  # an instance keeps at least this share of its own area
MIN_VISIBLE_PIXELS = 40  # ... and at least this many pixels
HOLE_RATIO_RANGE = (0.45, 0.7)  # inner / outer size of ring and square_frame
MAX_SQUARE_ROTATION_DEG = 20.0
MIN_COLOUR_CONTRAST = 80.0  # RGB distance to (nearly all) pixels of the area an object covers
_PLACEMENT_TRIES = 20
_COLOUR_CANDIDATES = 16


# --------------------------------------------------------------------------- shapes


def _shape_patch(rng, class_name, extent):
    """Rasterise one shape, centred in a small square patch.

    ``extent`` is the shape's width/height in pixels (the box side), the same
    for every class, so boxes do not reveal the class.

    Returns:
        bool array (P, P), P = ceil(extent) + 2.
    """
    side = int(np.ceil(extent)) + 2
    centre = side / 2.0 + rng.uniform(-0.5, 0.5, size=2)
    coords = np.arange(side) + 0.5  # pixel centres
    dx = coords[None, :] - centre[0]  # (1, P)
    dy = coords[:, None] - centre[1]  # (P, 1)
    radius = extent / 2.0

    if class_name in ("disc", "ring"):
        dist = np.sqrt(dx * dx + dy * dy)
        patch = dist <= radius
        if class_name == "ring":
            patch &= dist > radius * rng.uniform(*HOLE_RATIO_RANGE)
        return patch

    if class_name in ("square", "square_frame"):
        theta = np.deg2rad(rng.uniform(-MAX_SQUARE_ROTATION_DEG, MAX_SQUARE_ROTATION_DEG))
        cos, sin = np.cos(theta), np.sin(theta)
        # Shrink the side so the rotated square still spans ``extent``.
        half_side = radius / (abs(cos) + abs(sin))
        chebyshev = np.maximum(np.abs(dx * cos + dy * sin), np.abs(-dx * sin + dy * cos))
        patch = chebyshev <= half_side
        if class_name == "square_frame":
            patch &= chebyshev > half_side * rng.uniform(*HOLE_RATIO_RANGE)
        return patch

    if class_name == "triangle":
        angles = rng.uniform(0, 2 * np.pi) + np.deg2rad([0, 120, 240] + rng.uniform(-15, 15, size=3))
        xs, ys = radius * np.cos(angles), radius * np.sin(angles)
        signs = []
        for i in range(3):
            j = (i + 1) % 3
            signs.append((dx - xs[i]) * (ys[j] - ys[i]) - (dy - ys[i]) * (xs[j] - xs[i]) >= 0)
        inside_all = signs[0] & signs[1] & signs[2]
        outside_all = ~signs[0] & ~signs[1] & ~signs[2]
        return inside_all | outside_all

    raise ValueError(f"Unknown shape class {class_name!r}")


# --------------------------------------------------------------------------- background


def _linear_upsample(grid, size):
    """Bilinearly upsample a (g, g, 3) grid to (size, size, 3), corners aligned."""
    g = grid.shape[0]
    positions = np.linspace(0, g - 1, size)
    weights = np.maximum(0.0, 1.0 - np.abs(positions[:, None] - np.arange(g)[None, :]))  # (size, g)
    rows = np.tensordot(weights, grid, axes=(1, 0))  # (size, g, 3)
    return np.tensordot(rows, weights, axes=(1, 1)).transpose(0, 2, 1)  # (size, size, 3)


def _background(rng, image_size):
    """Textured float32 RGB background (H, W, 3) in [0, 255]."""
    base_colour = rng.uniform(30, 225, size=3)
    cells = int(rng.integers(3, 8))
    grid = base_colour + rng.normal(0, 35, size=(cells, cells, 3))
    image = _linear_upsample(grid, image_size)

    coords = np.arange(image_size, dtype=np.float64)
    xs, ys = coords[None, :], coords[:, None]
    if rng.random() < 0.5:  # stripes
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 40)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase)
        image += wave[:, :, None] * rng.uniform(8, 30) * rng.uniform(0.5, 1.0, size=3)
    if rng.random() < 0.5:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (xs * np.cos(angle) + ys * np.sin(angle)) / image_size  # about [-1.4, 1.4]
        image += ramp[:, :, None] * rng.uniform(-30, 30, size=3)
    return np.clip(image, 0, 255).astype(np.float32)


def _contrasting_colour(rng, covered_pixels):
    """A random RGB colour far from (nearly all) of ``covered_pixels`` (N, 3)."""
    candidates = rng.uniform(0, 255, size=(_COLOUR_CANDIDATES, 3))
    sample = covered_pixels[:: max(1, len(covered_pixels) // 512)]
    dist = np.linalg.norm(sample[None, :, :] - candidates[:, None, :], axis=2)  # (C, N)
    # The 5% quantile, not the mean: the object must stand out from every
    # region it covers (stripes, objects underneath), not from their average.
    contrast = np.quantile(dist, 0.05, axis=1)
    good = np.flatnonzero(contrast >= MIN_COLOUR_CONTRAST)
    return candidates[good[0] if len(good) else int(np.argmax(contrast))]


# --------------------------------------------------------------------------- images


def generate_image(rng, image_size, num_objects=(2, 6), size_range=(0.18, 0.45)):
    """Draw one synthetic image.

    Args:
        rng (np.random.Generator): the only source of randomness.
        image_size (int): S, images are S x S.
        num_objects (tuple[int, int]): inclusive range of objects drawn.
        size_range (tuple[float, float]): object extent as a fraction of S.

    Returns:
        image: uint8 array (S, S, 3), RGB.
        instances: list of (class_index, visible mask as bool (S, S)), in
            drawing order; the masks are pairwise disjoint. Never empty for
            S >= 80 (the first object always fits); at smaller S an object
            under ``MIN_VISIBLE_PIXELS`` is skipped, so it can be.
    """
    canvas = _background(rng, image_size)
    visible_masks, visible_areas, full_areas, classes = [], [], [], []

    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        class_index = int(rng.integers(len(SHAPE_CLASSES)))
        extent = rng.uniform(*size_range) * image_size
        patch = _shape_patch(rng, SHAPE_CLASSES[class_index], min(extent, image_size - 2))
        side = patch.shape[0]
        area = int(patch.sum())
        if area < MIN_VISIBLE_PIXELS:
            continue

        for _ in range(_PLACEMENT_TRIES):
            y0, x0 = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            window = (slice(y0, y0 + side), slice(x0, x0 + side))
            remaining = [va - int((m[window] & patch).sum()) for m, va in zip(visible_masks, visible_areas)]
            if all(r >= max(MIN_VISIBLE_FRACTION * fa, MIN_VISIBLE_PIXELS) for r, fa in zip(remaining, full_areas)):
                break
        else:
            continue  # every position hides an earlier object too much: skip this one

        mask = np.zeros((image_size, image_size), dtype=bool)
        mask[window] = patch
        canvas[mask] = _contrasting_colour(rng, canvas[window].reshape(-1, 3))
        for m in visible_masks:
            m &= ~mask
        visible_masks.append(mask)
        visible_areas[:] = remaining
        visible_areas.append(area)
        full_areas.append(area)
        classes.append(class_index)

    canvas += rng.normal(0, rng.uniform(2, 8), size=canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, list(zip(classes, visible_masks))


# --------------------------------------------------------------------------- splits


def _split_params(num_images, seed, image_size, num_objects, size_range):
    # Stored in the json's "info" so an existing split can be checked against a request.
    return {
        "generator": GENERATOR_VERSION,
        "num_images": int(num_images),
        "seed": int(seed),
        "image_size": int(image_size),
        "num_objects": [int(v) for v in num_objects],
        "size_range": [float(v) for v in size_range],
    }


def _annotation(mask, class_index, annotation_id, image_id):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": class_index + 1,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],  # tight XYWH of the visible mask
        "iscrowd": 0,
    }


def _write_split(split_dir, params, progress, desc):
    """Write images, then annotations.json, into ``split_dir`` (which exists)."""
    image_dir = split_dir / IMAGES_DIR
    image_dir.mkdir()
    size = params["image_size"]
    images, annotations = [], []
    for index in tqdm(range(params["num_images"]), desc=desc, disable=not progress):
        # One generator per image: image i does not depend on how many are generated.
        rng = np.random.default_rng([params["seed"], index])
        image, instances = generate_image(rng, size, params["num_objects"], params["size_range"])
        file_name = f"{index:06d}.png"
        if not cv2.imwrite(str(image_dir / file_name), image[:, :, ::-1]):
            raise OSError(f"Could not write {image_dir / file_name}")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for class_index, mask in instances:
            annotations.append(_annotation(mask, class_index, len(annotations) + 1, image_id))

    dataset = {
        "info": {"description": "MNC synthetic shapes", **params},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
    }
    with open(split_dir / ANNOTATIONS_FILE, "w") as f:
        json.dump(dataset, f)


def _existing_params(json_path):
    with open(json_path) as f:
        info = json.load(f).get("info", {})
    return {key: info.get(key) for key in ("generator", "num_images", "seed", "image_size", "num_objects", "size_range")}


def generate_split(
    out_dir,
    num_images,
    seed,
    image_size=256,
    progress=True,
    *,
    num_objects=(2, 6),
    size_range=(0.18, 0.45),
    overwrite=False,
):
    """Generate one split into ``out_dir`` (``images/`` + ``annotations.json``).

    A split already there with the same parameters is reused; one with other
    parameters raises ``FileExistsError`` unless ``overwrite``. Safe against
    interruption and against several processes generating the same split at
    once: each writes a unique temporary sibling directory and renames it into
    place; whoever loses the race discards its copy.

    Returns:
        str: path of ``annotations.json``.
    """
    out_dir = Path(out_dir).expanduser()
    json_path = out_dir / ANNOTATIONS_FILE
    params = _split_params(num_images, seed, image_size, num_objects, size_range)
    if json_path.exists() and not overwrite:
        existing = _existing_params(json_path)
        if existing != params:
            raise FileExistsError(
                f"{out_dir} holds a split generated with {existing}, not {params}; "
                "delete it or pass overwrite=True (--overwrite)."
            )
        return str(json_path)

    build_dir_atomically(
        out_dir,
        lambda tmp_dir: _write_split(tmp_dir, params, progress, desc=f"mnc_shapes {out_dir.name}"),
        ANNOTATIONS_FILE,
        replace=overwrite,
    )
    return str(json_path)


# --------------------------------------------------------------------------- CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="writes OUT/train and OUT/val")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="train uses SEED, val SEED + 1")
    parser.add_argument("--num-objects", type=int, nargs=2, default=(2, 6), metavar=("MIN", "MAX"))
    parser.add_argument("--size-range", type=float, nargs=2, default=(0.18, 0.45), metavar=("MIN", "MAX"),
                        help="object extent as a fraction of the image side")
    parser.add_argument("--overwrite", action="store_true", help="replace splits generated with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    for split, num_images, seed in (("train", args.num_train, args.seed), ("val", args.num_val, args.seed + 1)):
        json_path = generate_split(
            Path(args.out) / split,
            num_images,
            seed,
            args.image_size,
            progress=not args.quiet,
            num_objects=tuple(args.num_objects),
            size_range=tuple(args.size_range),
            overwrite=args.overwrite,
        )
        print(json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
