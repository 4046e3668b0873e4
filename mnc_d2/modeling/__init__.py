from .mask_head import MNCMaskHead
from .proposal_generator import MNCRPN
from .meta_arch import MNC
from .roi_heads import MNCROIHeads

__all__ = ["MNC", "MNCROIHeads", "MNCMaskHead", "MNCRPN"]
