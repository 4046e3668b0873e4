"""Registration of the builtin datasets, as Detectron2's ``data/datasets/builtin.py``: the synthetic
shapes (the project default, below), HeLa nuclei (:mod:`.hela`) and SBD / VOC 2012 (:mod:`.voc_sbd`).

Registered at import of ``mnc_d2.data``:

==========================  ======  ======  ====
name                        images  size    seed
==========================  ======  ======  ====
``mnc_shapes_train``        600     256     0
``mnc_shapes_val``          100     256     1
``mnc_shapes_tiny_train``   24      160     10
``mnc_shapes_tiny_val``     8       160     11
==========================  ======  ======  ====

Images are generated on first use (inside the ``DatasetCatalog`` loader, not
at import) into ``$MNC_D2_CACHE/datasets/mnc_shapes_v1/<variant>/``
(``MNC_D2_CACHE`` defaults to ``~/.cache/mnc_d2``; it is read when
:func:`register_all_mnc_shapes` runs, i.e. at import unless called again).

Masks are stored as RLE, so configs must set ``INPUT.MASK_FORMAT: bitmask``.
``COCOEvaluator`` reads ``metadata.json_file``: call :func:`ensure_mnc_shapes`
before building one.
"""

import functools
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .common import cache_root, register_dataset
from .hela import register_all_hela
from .synthetic import ANNOTATIONS_FILE, GENERATOR_VERSION, IMAGES_DIR, SHAPE_CLASSES, generate_split
from .voc_sbd import register_all_voc_sbd

__all__ = ["register_mnc_shapes", "register_all_mnc_shapes", "ensure_mnc_shapes", "default_cache_root"]

logger = logging.getLogger(__name__)

_BUILTIN_SPLITS = {
    "mnc_shapes_train": dict(num_images=600, seed=0, image_size=256),
    "mnc_shapes_val": dict(num_images=100, seed=1, image_size=256),
    "mnc_shapes_tiny_train": dict(num_images=24, seed=10, image_size=160),
    "mnc_shapes_tiny_val": dict(num_images=8, seed=11, image_size=160),
}

# RGB per class in SHAPE_CLASSES order, for the Visualizer.
_THING_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def default_cache_root():
    """``$MNC_D2_CACHE/datasets/mnc_shapes_v1`` (default cache ``~/.cache/mnc_d2``)."""
    return os.path.join(cache_root(), "datasets", GENERATOR_VERSION)


def register_mnc_shapes(name, root, num_images, seed, image_size):
    """Register a synthetic shapes split whose files live (or will be generated) in ``root``.

    Idempotent: registering a name again with the same arguments does nothing;
    with other arguments it replaces the old registration (with a warning).
    """
    root = os.path.abspath(os.path.expanduser(root))
    params = dict(root=root, num_images=int(num_images), seed=int(seed), image_size=int(image_size))
    # As D2's register_coco_instances, but the loader generates the files on first use.
    register_dataset(
        name,
        functools.partial(_load_mnc_shapes, name),
        "mnc_shapes",  # generator arguments, read by ensure_mnc_shapes
        params,
        thing_classes=list(SHAPE_CLASSES),
        thing_colors=list(_THING_COLORS),
        json_file=os.path.join(root, ANNOTATIONS_FILE),
        image_root=os.path.join(root, IMAGES_DIR),
        evaluator_type="coco",
    )


def register_all_mnc_shapes(root=None):
    """Register the builtin splits under ``root`` (default :func:`default_cache_root`)."""
    root = default_cache_root() if root is None else root
    for name, params in _BUILTIN_SPLITS.items():
        register_mnc_shapes(name, os.path.join(root, name[len("mnc_shapes_"):]), **params)


def ensure_mnc_shapes(name):
    """Generate the registered split ``name`` if it is not on disk yet.

    Returns:
        str: the split's COCO json path. For a dataset not registered through
        :func:`register_mnc_shapes` nothing is generated and its
        ``metadata.json_file`` (or None) is returned, so callers need not
        special-case other datasets.
    """
    if name not in DatasetCatalog.list():
        raise KeyError(f"Dataset {name!r} is not registered")
    metadata = MetadataCatalog.get(name)
    params = getattr(metadata, "mnc_shapes", None)
    if params is None:
        return getattr(metadata, "json_file", None)
    json_file = os.path.join(params["root"], ANNOTATIONS_FILE)
    if not os.path.exists(json_file):
        logger.info(f"Generating dataset {name!r} ({params['num_images']} images) into {params['root']}")
    return generate_split(params["root"], params["num_images"], params["seed"], params["image_size"])


def _load_mnc_shapes(name):
    json_file = ensure_mnc_shapes(name)
    return load_coco_json(json_file, MetadataCatalog.get(name).image_root, name)


register_all_mnc_shapes()
register_all_hela()
register_all_voc_sbd()
