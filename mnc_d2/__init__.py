"""mnc_d2: Multi-task Network Cascades (Dai, He, Sun, CVPR 2016) as a Detectron2 extension.

Importing this package registers the meta-architecture ``MNC``, the ROI heads ``MNCROIHeads``, the
mask head ``MNCMaskHead``, the proposal generator ``MNCRPN`` and the built-in datasets.
"""
from .utils.env import check_detectron2

check_detectron2()

from .config import add_mnc_config  # noqa: E402
from . import modeling  # noqa: E402,F401  (registers the model parts)
from . import data  # noqa: E402,F401  (registers the datasets)

__version__ = "0.1.0"
__all__ = ["add_mnc_config"]
