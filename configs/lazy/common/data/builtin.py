# Train/test loaders of mnc_d2 (checked datasets, RobustDatasetMapper, the resumable training stream) over
# registered datasets; derived configs set the names, sizes and batch.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

from mnc_d2.data.build import build_mnc_test_loader, build_mnc_train_loader
from mnc_d2.data.mapper import RobustDatasetMapper

dataloader = OmegaConf.create()

dataloader.train = L(build_mnc_train_loader)(
    names="coco_2017_train",
    mapper=L(RobustDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(640, 672, 704, 736, 768, 800), sample_style="choice",
                                    max_size=1333),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
        use_instance_mask=True,
        instance_mask_format="polygon",
        bad_image="skip",
    ),
    total_batch_size=16,
    num_workers=4,
    num_classes="${model.roi_heads.num_classes}",
)

dataloader.test = L(build_mnc_test_loader)(
    name="coco_2017_val",
    mapper=L(RobustDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
        instance_mask_format="${...train.mapper.instance_mask_format}",
    ),
    num_workers=4,
    num_classes="${model.roi_heads.num_classes}",
)
