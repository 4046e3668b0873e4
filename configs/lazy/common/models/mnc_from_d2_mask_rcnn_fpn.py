# Detectron2's own LazyConfig Mask R-CNN (model_zoo "common/models/mask_rcnn_fpn.py") switched to MNC, the
# LazyConfig twin of "a D2 config plus two keys": MNC's meta-architecture and ROI heads (mnc_fpn.py), with D2's
# mask head and its 14x14 pooler as the output mask head on the final boxes (class-agnostic, as every MNC mask).
# The same lines switch a Mask R-CNN model tree of your own.
from detectron2.model_zoo import get_config

from .mnc_fpn import model as mnc

model = get_config("common/models/mask_rcnn_fpn.py").model
d2_heads = model.roi_heads
model._target_ = mnc._target_
model.mask_voting, model.mask_threshold = mnc.mask_voting, mnc.mask_threshold
model.roi_heads = mnc.roi_heads
model.roi_heads.num_classes = d2_heads.num_classes
model.roi_heads.final_pooler = d2_heads.mask_pooler
model.roi_heads.final_mask_head = d2_heads.mask_head
model.roi_heads.final_mask_head.num_classes = 1
