"""Datasets named on the command line, registered before the config is read so that
``DATASETS.TRAIN`` / ``DATASETS.TEST`` can name them (``train_net.py`` and the demo)::

    --dataset NAME=path/to/annotations.json:path/to/images     # COCO format, as register_coco_instances
    --dataset NAME=path/to/images:path/to/labels               # label images, paired by file-name stem

A label-image folder pair gives one class ("object"): every non-zero value of a label image is one
instance. The option repeats; a bad path or spec raises :class:`~mnc_d2.utils.errors.ConfigError` naming it.
"""
import argparse
import os
from pathlib import Path
from typing import Iterable, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ...utils.errors import ConfigError
from .common import register_dataset
from .label_images import load_label_image_pairs

__all__ = ["add_dataset_argument", "parse_dataset_spec", "register_datasets"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SYNTAX = "NAME=ANNOTATIONS.json:IMAGE_DIR or NAME=IMAGE_DIR:LABEL_DIR"


def add_dataset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=ANNOTATIONS.json:IMAGE_DIR",
                        help="register a COCO-format dataset (or NAME=IMAGE_DIR:LABEL_DIR, label images) under "
                             "NAME, for DATASETS.TRAIN / DATASETS.TEST; repeatable")


def parse_dataset_spec(spec: str) -> Tuple[str, str, str, str]:
    """``NAME=A:B`` -> (name, kind "coco" or "labels", A, B); the paths must exist."""
    name, sep, paths = spec.partition("=")
    json_end = paths.find(".json:")
    if json_end >= 0:  # the json path may itself hold ':'
        first, second, kind = paths[:json_end + 5], paths[json_end + 6:], "coco"
    else:
        first, _, second = paths.rpartition(":")
        kind = "labels"
    if not (sep and name.strip() and first and second):
        raise ConfigError(f"--dataset {spec!r}: expected {_SYNTAX}")
    first, second = os.path.expanduser(first), os.path.expanduser(second)
    if kind == "coco" and not os.path.isfile(first):
        raise ConfigError(f"--dataset {spec!r}: annotation file {first} does not exist")
    for path, what in ((first, "image directory"), (second, "label directory")) if kind == "labels" else \
            ((second, "image directory"),):
        if not os.path.isdir(path):
            raise ConfigError(f"--dataset {spec!r}: {what} {path} does not exist or is not a directory")
    return name.strip(), kind, first, second


def _label_pairs(spec: str, image_dir: str, label_dir: str) -> Tuple[List[str], List[str]]:
    """Image and label files paired by stem; an image without a label (or the reverse) raises."""
    def by_stem(folder):
        return {p.stem: str(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES}

    images, labels = by_stem(image_dir), by_stem(label_dir)
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired or not images:
        problem = f"files without a partner: {', '.join(unpaired[:5])}" if unpaired else "no images"
        raise ConfigError(f"--dataset {spec!r}: {image_dir} and {label_dir} must hold images and label images "
                          f"of the same names ({problem})")
    stems = sorted(images)
    return [images[s] for s in stems], [labels[s] for s in stems]


def register_datasets(specs: Iterable[str]) -> List[str]:
    """Register every ``--dataset`` spec (idempotent for the same spec); returns the names."""
    names = []
    for spec in specs:
        name, kind, first, second = parse_dataset_spec(spec)
        if name in DatasetCatalog.list() and MetadataCatalog.get(name).get("command_line_spec", None) is None:
            raise ConfigError(f"--dataset {spec!r}: {name!r} is already a registered dataset; choose another name")
        if kind == "coco":
            json_file, image_root = os.path.abspath(first), os.path.abspath(second)
            register_dataset(name, lambda j=json_file, r=image_root, n=name: load_coco_json(j, r, n),
                             "command_line_spec", spec, json_file=json_file, image_root=image_root,
                             evaluator_type="coco")
        else:
            image_files, label_files = _label_pairs(spec, first, second)
            register_dataset(name, lambda i=image_files, lb=label_files: load_label_image_pairs(i, lb),
                             "command_line_spec", spec, thing_classes=["object"], evaluator_type="coco")
        names.append(name)
    return names
