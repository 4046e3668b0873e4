# The main job (configs/mnc_R18_GN_FPN_shapes_cpu.yaml) as a LazyConfig: MNC's default, three stages,
# ResNet-18-FPN with GroupNorm from scratch, on the built-in synthetic shapes, on CPU (2 cores).
#   python train_net.py --config-file configs/lazy/mnc_R18_GN_FPN_shapes_cpu.py [train.max_iter=100 ...]
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import ResNet

from .common.data.builtin import dataloader
from .common.models.mnc_fpn import model
from .common.optim import SGD as optimizer
from .common.schedule import multi_step
from .common.train import train

bottom_up = model.backbone.bottom_up
bottom_up.stem.norm = "GN"
bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="GN")
bottom_up.freeze_at = 0
model.backbone.norm = "GN"
model.backbone.out_channels = 128

rpn = model.proposal_generator
rpn.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
rpn.pre_nms_topk = (1000, 500)
rpn.post_nms_topk = (300, 200)  # the cascade runs three heads on each test RoI (MNC: 300)
rpn.batch_size_per_image = 128

heads = model.roi_heads
heads.num_classes = 5
heads.box_pathway.fc_dims = [256, 256]  # CPU narrowing (MNC/D2: 1024)
heads.box_predictor.input_shape.channels = 512
heads.box_predictor.test_topk_per_image = 50
heads.final_mask_head.conv_dims = [64] * 5  # CPU narrowing of the final head's 4 convs (+ deconv)

train_mapper, test_mapper = dataloader.train.mapper, dataloader.test.mapper
train_mapper.augmentations[0].short_edge_length = (224, 256, 288)
train_mapper.augmentations[0].max_size = 480
test_mapper.augmentations[0].short_edge_length = 256
test_mapper.augmentations[0].max_size = 480
train_mapper.instance_mask_format = "bitmask"
dataloader.train.names = "mnc_shapes_train"
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.name = "mnc_shapes_val"
dataloader.test.num_workers = 1

train.device = "cpu"
train.max_iter = 600
train.eval_period = 600
train.checkpointer.period = 200
train.seed = 1
train.output_dir = "./output/mnc_R18_GN_FPN_shapes_cpu_lazy"
lr_multiplier = multi_step(train.max_iter, steps=(450, 550), warmup_iters=50)

del bottom_up, rpn, heads, train_mapper, test_mapper  # aliases only: not top-level config keys
