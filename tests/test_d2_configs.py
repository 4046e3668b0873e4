"""Switching Detectron2's own model-zoo Mask R-CNN configs to MNC (docs/workflows.md, workflow 1).

Each config is D2's yaml as installed with detectron2, plus the two switches
``MODEL.META_ARCHITECTURE MNC MODEL.ROI_HEADS.NAME MNCROIHeads`` (C4 configs included: MNC builds its
stage-3 pathway head itself when ``ROI_BOX_HEAD.NAME`` is empty), plus ``FAST_OPTS`` that only shrink the work (CPU, fewer proposals and detections).
Random weights: the last norm of every residual branch is zeroed ("zero-init residual") so a
randomly initialised deep ResNet gives finite features and hence detections.
"""
import argparse

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import mnc_d2
from conftest import make_targets
from mnc_d2.engine import setup_cfg
from mnc_d2.modeling import MNC, MNCROIHeads

R50_FPN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
R50_C4 = "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml"
SWITCH_OPTS = ["MODEL.META_ARCHITECTURE", "MNC", "MODEL.ROI_HEADS.NAME", "MNCROIHeads"]
FAST_OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 30,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 30,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    "TEST.DETECTIONS_PER_IMAGE", 5,
]
IMAGE_SIZE = (128, 160)
OUTPUT_SIZE = (256, 320)  # the second image asks for 2x output, like a resized input would


def switched_cfg(zoo_name, *opts):
    cfg = get_cfg()
    mnc_d2.add_mnc_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(zoo_name))
    cfg.merge_from_list([*SWITCH_OPTS, *FAST_OPTS, *opts])
    return cfg


def build_switched(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, MNC) and isinstance(model.roi_heads, MNCROIHeads)
    with torch.no_grad():
        for name, module in model.backbone.named_modules():
            if name.endswith("conv3.norm"):  # zero-init residual: see the module docstring
                module.weight.zero_()
    return model


def make_inputs():
    """Two random images with two GT instances each; the second wants its output at OUTPUT_SIZE."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for out_size in (IMAGE_SIZE, OUTPUT_SIZE):
        image = (torch.rand((3, *IMAGE_SIZE), generator=g) * 255).round()
        targets = make_targets(IMAGE_SIZE, boxes=((10, 20, 70, 100), (60, 30, 150, 120)), classes=(0, 3))
        inputs.append({"image": image, "instances": targets, "height": out_size[0], "width": out_size[1]})
    return inputs


def check_train_step(model):
    model.train()
    with EventStorage():
        losses = model(make_inputs())
    assert {"loss_mask", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.segment_pathway.fc1.weight.grad is not None


def check_inference(model, num_classes):
    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in make_inputs()])
    assert len(outputs) == 2
    for out, (height, width) in zip(outputs, (IMAGE_SIZE, OUTPUT_SIZE)):
        instances = out["instances"]
        assert isinstance(instances, Instances) and instances.image_size == (height, width)
        assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
        assert 0 < len(instances) <= 5
        assert isinstance(instances.pred_boxes, Boxes)
        boxes = instances.pred_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert instances.scores.shape == (len(instances),)
        assert ((instances.pred_classes >= 0) & (instances.pred_classes < num_classes)).all()
        assert instances.pred_masks.shape == (len(instances), height, width)
        assert instances.pred_masks.dtype == torch.bool


@pytest.mark.parametrize("zoo_name, opts", [(R50_FPN, []), (R50_C4, [])], ids=["R50-FPN", "R50-C4"])
def test_switch_train_and_infer(zoo_name, opts):
    cfg = switched_cfg(zoo_name, *opts)
    model = build_switched(cfg)
    check_train_step(model)
    check_inference(model, cfg.MODEL.ROI_HEADS.NUM_CLASSES)


@pytest.mark.parametrize("zoo_name, opts", [
    ("COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml", []),
    ("COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml", []),
    ("Cityscapes/mask_rcnn_R_50_FPN.yaml", []),
    # 1203 classes: 3 RoIs keep the (RoI, class) candidates under 4000, where NMS stays vectorised on CPU
    ("LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", ["MODEL.RPN.POST_NMS_TOPK_TEST", 3]),
], ids=["R101-FPN", "X101-FPN", "Cityscapes", "LVISv1"])
def test_switch_build_and_infer(zoo_name, opts):
    """Other backbones / class counts: the MNC part of the train step is the one tested above."""
    cfg = switched_cfg(zoo_name, *opts)
    model = build_switched(cfg)
    assert model.roi_heads.box_predictor.cls_score.out_features == cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1
    check_inference(model, cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def test_c4_config_gets_mnc_pathway_heads():
    """D2's C4 configs have no ROI_BOX_HEAD.NAME (Res5ROIHeads): MNC builds conv + 2 FC pathways on res4."""
    cfg = switched_cfg(R50_C4)
    assert cfg.MODEL.ROI_BOX_HEAD.NAME == "" and cfg.MODEL.ROI_HEADS.IN_FEATURES == ["res4"]
    heads = build_switched(cfg).roi_heads
    assert type(heads.box_pathway).__name__ == "FastRCNNConvFCHead" and len(heads.box_pathway.conv_norm_relus) == 1
    assert heads.box_predictor.cls_score.in_features == 2 * 1024


def test_faster_rcnn_config_needs_mask_on():
    cfg = switched_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    with pytest.raises(ValueError, match="MASK_ON"):
        build_model(cfg)


def test_short_yaml_through_setup_cfg(tmp_path):
    """A user yaml whose _BASE_ is D2's file (absolute path) gives the same config as the command-line
    switch, through train_net.py's setup_cfg."""
    user_yaml = tmp_path / "mnc_from_d2.yaml"
    user_yaml.write_text(
        f'_BASE_: "{model_zoo.get_config_file(R50_FPN)}"\n'
        "MODEL:\n"
        '  META_ARCHITECTURE: "MNC"\n'
        "  ROI_HEADS:\n"
        '    NAME: "MNCROIHeads"\n'
    )
    args = argparse.Namespace(config_file=str(user_yaml), opts=[*FAST_OPTS, "OUTPUT_DIR", str(tmp_path / "out")],
                              eval_only=False, resume=False, num_gpus=0)
    cfg = setup_cfg(args)
    expected = switched_cfg(R50_FPN)
    assert cfg.MODEL == expected.MODEL
    assert (tmp_path / "out" / "config.yaml").exists()  # default_setup ran
    assert isinstance(build_model(cfg).roi_heads, MNCROIHeads)
