# configs/mnc_R_50_FPN_sbd_5stage.yaml as a LazyConfig: the paper's VOC benchmark, five stages with box
# gradients, SBD train -> mAP^r on SBD val (and VOC 2012 val: train_net.py evaluates DATASETS.TEST, here
# dataloader.test.name plus extra_test_names).
from detectron2.config import LazyCall as L

from mnc_d2.modeling.roi_warp import ROIWarper

from .common.models.mnc_fpn import SCALES
from .common.schedule import multi_step
from .mnc_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

heads = model.roi_heads
heads.num_classes = 20
heads.num_stages = 5
# box gradients: the RoI features come from a warp differentiable in the boxes (RoIAlign's values without
# autograd), the summed box gradient bounded elementwise (MODEL.MNC.BOX_GRADIENTS.CLIP)
heads.box_gradients = True
heads.inference_pooler = heads.roi_pooler
heads.roi_pooler = L(ROIWarper)(output_size=7, scales=SCALES, sampling_ratio=2)
model.proposal_generator.box_gradients = True

for loader in (dataloader.train, dataloader.test):
    loader.mapper.augmentations[0].short_edge_length = (600,) if loader is dataloader.train else 600
    loader.mapper.augmentations[0].max_size = 1000
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.train.names = "sbd_2012_train"
dataloader.train.total_batch_size = 8
dataloader.test.name = "sbd_2012_val"
extra_test_names = ["voc_2012_seg_val"]

optimizer.lr = 0.01
train.max_iter = 24000
train.eval_period = 6000
train.output_dir = "./output/mnc_R_50_FPN_sbd_5stage"
lr_multiplier = multi_step(train.max_iter, steps=(18000,), warmup_iters=1000)
del heads, loader  # aliases only: not top-level config keys
