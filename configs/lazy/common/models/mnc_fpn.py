# MNC's default on ResNet-50-FPN as a LazyConfig tree: the same model as configs/Base-MNC.yaml + R-50 (state-dict
# keys and shapes are tested equal), built from the @configurable constructors as D2's
# configs/common/models/mask_rcnn_fpn.py builds Mask R-CNN. Derived configs change fields of this tree.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, MaskRCNNConvUpsampleHead

from mnc_d2.modeling import MNC, MNCMaskHead, MNCROIHeads, MNCRPN

SCALES = (1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32)

model = L(MNC)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        norm="",
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(MNCRPN)(  # D2's RPN; differentiable proposals when box_gradients
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels="${...backbone.out_channels}", num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]], aspect_ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),
        post_nms_topk=(300, 300),  # MNC: 300 proposals per image (D2: 1000)
        nms_thresh=0.7,
        min_box_size=16,  # MNC: minimum proposal side 16 px
        box_gradients=False,
        delta_clip=0.0,
    ),
    roi_heads=L(MNCROIHeads)(
        num_classes=80,
        batch_size_per_image=64,  # MNC: 64 RoIs per image, <= 30 % foreground
        positive_fraction=0.3,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        in_features=["p2", "p3", "p4", "p5"],
        roi_pooler=L(ROIPooler)(output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2"),
        # stage 2: the paper's FC head, one class-agnostic 21x21 mask per RoI
        mask_head=L(MNCMaskHead)(
            input_shape=L(ShapeSpec)(channels="${....backbone.out_channels}", height=7, width=7),
            conv_dims=[], fc_dim=256, mask_size=21,
        ),
        # the output masks: D2's conv head with its own 14x14 RoIAlign, on the final boxes (built before the
        # stage-3 heads, in from_config's order: the same initial weights for a seed)
        final_pooler=L(ROIPooler)(output_size=14, scales=SCALES, sampling_ratio=0, pooler_type="ROIAlignV2"),
        final_mask_head=L(MaskRCNNConvUpsampleHead)(
            input_shape=L(ShapeSpec)(channels="${....backbone.out_channels}", height=14, width=14),
            num_classes=1,
            conv_dims=[256, 256, 256, 256, 256],
        ),
        # stage 3: two pathways (the RoI features, and the same times the stage-2 mask) -> classes + boxes
        box_pathway=L(FastRCNNConvFCHead)(
            input_shape=L(ShapeSpec)(channels="${....backbone.out_channels}", height=7, width=7),
            conv_dims=[], fc_dims=[1024, 1024],
        ),
        segment_pathway="${.box_pathway}",
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=L(ShapeSpec)(channels=2048),  # the two pathways' features, concatenated
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
            test_score_thresh=0.05,
            test_nms_thresh=0.5,
            test_topk_per_image=100,
            loss_weight={"loss_box_reg": 1.0},
        ),
        refined_mask_loss=True,
        masks_on_final_boxes=True,
        num_stages=3,
        pathway_pool=1,
        box_gradient_clip=1e-6,  # MODEL.MNC.BOX_GRADIENTS.CLIP: acts only with box_gradients
    ),
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
    mask_voting=False,
    mask_threshold=0.5,  # MODEL.MNC.TEST.MASK_THRESHOLD (Base-MNC.yaml)
)
