"""Switching Detectron2's own model-zoo Mask R-CNN configs to MNC (docs/workflows.md, workflow 1).

Each config is D2's yaml as installed with detectron2, plus the two switches
``MODEL.META_ARCHITECTURE MNC MODEL.ROI_HEADS.NAME MNCROIHeads`` (C4 configs included: MNC builds its
stage-3 pathway head itself when ``ROI_BOX_HEAD.NAME`` is empty), plus ``FAST_OPTS`` that only shrink the work (CPU, fewer proposals and detections).
Random weights: the last norm of every residual branch is zeroed ("zero-init residual") so a
randomly initialised deep ResNet gives finite features and hence detections.
"""
import argparse
import logging
import os
import subprocess
import sys

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import mnc_d2
from detectron2.config import LazyConfig, instantiate

from conftest import REPO, make_targets
from mnc_d2.config import build_cfg
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


# ---- the two keys build MNC's default (configs/Base-MNC.yaml), differing only in these D2 keys
def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key: value})
    return out


# D2 keys where Base-MNC.yaml keeps the authors' recipe (D2's zoo file -> ours); the MODEL.MNC.* keys are all equal
RECIPE_DIFFERENCES = {
    "ROI_HEADS.BATCH_SIZE_PER_IMAGE": (512, 64), "ROI_HEADS.POSITIVE_FRACTION": (0.25, 0.3),
    "ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": (0, 2), "PROPOSAL_GENERATOR.NAME": ("RPN", "MNCRPN"),
    "PROPOSAL_GENERATOR.MIN_SIZE": (0, 16), "RPN.POST_NMS_TOPK_TRAIN": (1000, 300), "RPN.POST_NMS_TOPK_TEST": (1000, 300),
}
C4_DIFFERENCES = {
    **RECIPE_DIFFERENCES, "RPN.POST_NMS_TOPK_TRAIN": (2000, 300),
    # D2's C4 has no box head (Res5ROIHeads): MNC builds ours, on 7x7 RoI features (the expected warning below)
    "ROI_BOX_HEAD.NAME": ("", "FastRCNNConvFCHead"), "ROI_BOX_HEAD.NUM_CONV": (0, 1), "ROI_BOX_HEAD.NUM_FC": (0, 2),
    "ROI_BOX_HEAD.POOLER_RESOLUTION": (14, 7), "FPN.IN_FEATURES": ([], ["res2", "res3", "res4", "res5"]),
    "ROI_MASK_HEAD.NUM_CONV": (0, 4),  # the output head: D2's C4 head has no convs (res5 comes before it)
}
C4_WARNINGS = ["MODEL.ROI_BOX_HEAD.NAME is empty (a C4 config?)"]


class _Records(logging.Handler):
    """WARNING-and-above records of mnc_d2's and D2's loggers (which may not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        for name in ("mnc_d2", "detectron2"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("mnc_d2", "detectron2"):
            logging.getLogger(name).removeHandler(self)


def _roi_heads_signature(model):
    """Module classes and tensor shapes of the ROI heads: what "the same model" means before training."""
    heads = model.roi_heads
    return ({name: type(m).__name__ for name, m in heads.named_modules()},
            {k: tuple(v.shape) for k, v in heads.state_dict().items()})


@pytest.mark.parametrize("zoo_name, ours, differences, warnings", [
    (R50_FPN, "configs/Base-MNC.yaml", RECIPE_DIFFERENCES, []),
    (R50_C4, "configs/mnc_R_50_C4_1x.yaml", C4_DIFFERENCES, C4_WARNINGS),
], ids=["R50-FPN", "R50-C4"])
def test_two_keys_build_mncs_default(zoo_name, ours, differences, warnings):
    """D2's zoo file + the two keys = our config, but for the listed D2 keys: every MODEL.MNC.* setting, the ROI
    heads' classes and tensor shapes (with the listed keys set as ours), and the warnings logged."""
    switched = build_cfg(model_zoo.get_config_file(zoo_name), SWITCH_OPTS + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    mnc_default = build_cfg(os.path.join(REPO, ours), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    a, b = _flat(switched.MODEL), _flat(mnc_default.MODEL)
    assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == differences
    assert switched.MODEL.MNC == mnc_default.MODEL.MNC
    aligned = build_cfg(model_zoo.get_config_file(zoo_name), SWITCH_OPTS + [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.ROI_MASK_HEAD.NUM_CONV", str(mnc_default.MODEL.ROI_MASK_HEAD.NUM_CONV)])
    with _Records() as records:
        model = build_model(aligned)
    assert [m for m in records.messages if not any(m.startswith(w) for w in warnings)] == []
    assert len(records.messages) == len(warnings)
    assert _roi_heads_signature(model) == _roi_heads_signature(build_model(mnc_default))


@pytest.mark.slow
def test_two_keys_train_and_infer_without_warning():
    """The switched R50-FPN (D2's 512 RoIs and 1000 proposals kept; small images) trains two steps and infers,
    and nothing logs a warning; the per-class mask setting is reported once, at INFO."""
    cfg = switched_cfg(R50_FPN, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 512, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 1000,
                       "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 2000, "MODEL.RPN.POST_NMS_TOPK_TEST", 1000,
                       "MODEL.RPN.PRE_NMS_TOPK_TEST", 1000)
    with _Records() as records:
        model = build_switched(cfg)
        assert model.roi_heads.final_mask_head is not None and model.roi_heads.masks_on_final_boxes
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for _ in range(2):
            check_train_step(model)
            optimizer.step()
            optimizer.zero_grad()
        check_inference(model, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    assert records.messages == []


def test_lazy_config_switch_builds_the_same_roi_heads():
    """configs/lazy/common/models/mnc_from_d2_mask_rcnn_fpn.py: D2's LazyConfig Mask R-CNN switched to MNC builds
    the ROI heads of configs/Base-MNC.yaml (ResNet-50-FPN)."""
    lazy = LazyConfig.load(os.path.join(REPO, "configs", "lazy", "common", "models", "mnc_from_d2_mask_rcnn_fpn.py"))
    model = instantiate(lazy.model)
    assert isinstance(model, MNC) and (model.mask_voting, model.mask_threshold) == (False, 0.5)
    yacs = build_model(build_cfg(os.path.join(REPO, "configs", "Base-MNC.yaml"), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]))
    assert _roi_heads_signature(model) == _roi_heads_signature(yacs)


@pytest.mark.slow
def test_faster_rcnn_config_with_two_keys_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
         model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"), *SWITCH_OPTS,
         "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [errors[0]] and "MODEL.MASK_ON must be True for MNC" in errors[0]
    assert "Traceback" not in proc.stderr


def test_forward_with_given_boxes_uses_the_output_head():
    """Masks for given boxes are those inference gives for the same boxes: the output head's, on those boxes."""
    model = build_switched(switched_cfg(R50_FPN))
    model.eval()
    inputs = [{k: v for k, v in x.items() if k not in ("instances", "height", "width")} for x in make_inputs()]
    with torch.no_grad():
        detected = [out["instances"] for out in model(inputs)]
        given = [Instances(d.image_size, pred_boxes=d.pred_boxes, pred_classes=d.pred_classes, scores=d.scores)
                 for d in detected]
        again = [out["instances"] for out in model.inference(inputs, detected_instances=given)]
    assert sum(len(d) for d in detected) > 0
    for d, a in zip(detected, again):
        assert a.pred_masks.shape == d.pred_masks.shape
        assert torch.equal(a.pred_masks, d.pred_masks)


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
