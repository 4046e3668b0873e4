"""Dataset generators and loaders, kept apart from the data loading code as in Detectron2's
``detectron2/data/datasets/``. Importing this package registers (see :mod:`.builtin`)
``mnc_shapes_*`` (synthetic, the default; :mod:`.synthetic`), ``hela_nuclei_*`` (microscopy;
:mod:`.hela`) and ``sbd_2012_*`` / ``voc_2012_seg_*`` (the MNC paper's benchmark; :mod:`.voc_sbd`).
Nothing touches the disk until a dataset is first loaded."""

import warnings

# `python -m mnc_d2.data.datasets.synthetic` imports this package, hence synthetic (via
# builtin), before running synthetic as __main__; runpy's warning about that is harmless.
warnings.filterwarnings(
    "ignore", message="'mnc_d2.data.datasets.synthetic' found in sys.modules", category=RuntimeWarning
)

from .builtin import default_cache_root, ensure_mnc_shapes, register_all_mnc_shapes, register_mnc_shapes  # noqa: E402
from .hela import ensure_hela, register_all_hela  # noqa: E402
from .label_images import label_image_to_annotations, load_label_image_pairs, register_label_image_dataset  # noqa: E402
from .synthetic import SHAPE_CLASSES, generate_image, generate_split  # noqa: E402
from .voc_sbd import register_all_voc_sbd  # noqa: E402

__all__ = [
    "SHAPE_CLASSES",
    "generate_image",
    "generate_split",
    "register_mnc_shapes",
    "register_all_mnc_shapes",
    "ensure_mnc_shapes",
    "default_cache_root",
    "register_all_hela",
    "ensure_hela",
    "label_image_to_annotations",
    "load_label_image_pairs",
    "register_label_image_dataset",
    "register_all_voc_sbd",
]
