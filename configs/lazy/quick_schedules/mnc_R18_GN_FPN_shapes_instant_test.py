# configs/quick_schedules/mnc_R18_GN_FPN_shapes_instant_test.yaml as a LazyConfig: a few iterations on the
# tiny synthetic split (tests).
from ..common.schedule import multi_step
from ..mnc_R18_GN_FPN_shapes_cpu import dataloader, model, optimizer, train

model.proposal_generator.pre_nms_topk = (300, 300)
model.proposal_generator.post_nms_topk = (100, 100)
dataloader.train.names = "mnc_shapes_tiny_train"
dataloader.train.mapper.augmentations[0].short_edge_length = (160,)
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.name = "mnc_shapes_tiny_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 160
dataloader.test.num_workers = 0
train.max_iter = 20
train.eval_period = 20
train.checkpointer.period = 10
train.output_dir = "./output/instant_test_lazy"
lr_multiplier = multi_step(train.max_iter, steps=(15,), warmup_iters=5)
