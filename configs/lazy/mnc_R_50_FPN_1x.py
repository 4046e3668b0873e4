# configs/mnc_R_50_FPN_1x.yaml as a LazyConfig: MNC's default, ResNet-50-FPN, COCO, 1x schedule.
from .common.data.builtin import dataloader
from .common.models.mnc_fpn import model
from .common.optim import SGD as optimizer
from .common.schedule import multi_step
from .common.train import train

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
lr_multiplier = multi_step(train.max_iter, steps=(60000, 80000), warmup_iters=1000)
