"""The MNC meta-architecture end to end on CPU: every shipped config builds; one train step and one
inference step on random 200x250 images; D2-standard outputs; config errors."""
import glob
import os

import pytest
import torch

import mnc_d2
from conftest import REPO, make_batch, small_cfg
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

SHIPPED_CONFIGS = sorted(
    p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


def load_cfg(path, *opts):
    cfg = get_cfg()
    mnc_d2.add_mnc_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_config_builds(path):
    cfg = load_cfg(path)
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    if cfg.MODEL.META_ARCHITECTURE == "MNC":
        assert type(model.roi_heads).__name__ == "MNCROIHeads"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_output_masks_are_binarised_at_their_heads_threshold(path):
    """D2's conv head (the default's output head) is binarised at Mask R-CNN's 0.5; the paper's FC head, which
    predicts the output masks when there is no final head, at the authors' 0.4."""
    cfg = load_cfg(path)
    if cfg.MODEL.META_ARCHITECTURE != "MNC":
        return
    mnc = cfg.MODEL.MNC
    d2_head_outputs = mnc.FINAL_MASK_HEAD.ENABLED and mnc.TEST.MASKS_ON_FINAL_BOXES
    assert mnc.TEST.MASK_THRESHOLD == (0.5 if d2_head_outputs else 0.4)


def test_registries_know_mnc_parts():
    from detectron2.modeling import META_ARCH_REGISTRY
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
    from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY

    assert META_ARCH_REGISTRY.get("MNC") is mnc_d2.modeling.MNC
    assert ROI_HEADS_REGISTRY.get("MNCROIHeads") is mnc_d2.modeling.MNCROIHeads
    assert ROI_MASK_HEAD_REGISTRY.get("MNCMaskHead") is mnc_d2.modeling.MNCMaskHead


def test_unknown_config_key_gives_d2_error(tmp_path):
    cfg = small_cfg()
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.MNC.NO_SUCH_KEY"):
        cfg.merge_from_list(["MODEL.MNC.NO_SUCH_KEY", 1])
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  MNC:\n    NUM_STAGE: 5\n")  # typo of NUM_STAGES
    with pytest.raises(KeyError, match="MODEL.MNC.NUM_STAGE"):
        small_cfg().merge_from_file(str(bad))


def test_add_mnc_config_is_idempotent_and_documented():
    cfg = get_cfg()
    mnc_d2.add_mnc_config(cfg)
    mnc_d2.add_mnc_config(cfg)
    source = open(os.path.join(REPO, "mnc_d2", "config", "defaults.py")).read()
    for line in source.splitlines():  # every key assignment is preceded by a one-line comment
        stripped = line.strip()
        if stripped.startswith("_C.") and "= CN()" not in stripped:
            previous = source.splitlines()[source.splitlines().index(line) - 1].strip()
            assert previous.startswith("#"), f"config key without a comment: {stripped}"


@pytest.mark.parametrize("opts", [[], ["MODEL.MNC.TEST.MASK_VOTING", False]], ids=["voting", "no-voting"])
def test_train_step_then_inference(opts):
    cfg = small_cfg(*opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = make_batch()
    with EventStorage():
        losses = model(batch)
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_mask", "loss_cls", "loss_box_reg"} <= set(losses)
    sum(losses.values()).backward()

    model.eval()
    inputs = [{"image": b["image"], "height": 100, "width": 125} for b in batch]  # output at half size
    with torch.no_grad():
        outputs = model(inputs)
    for out in outputs:
        inst = out["instances"]
        assert inst.image_size == (100, 125)
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
        assert inst.pred_masks.shape == (len(inst), 100, 125) and inst.pred_masks.dtype == torch.bool
        assert len(inst) > 0  # SCORE_THRESH_TEST is 0 in the small config


def test_empty_batch_trains_and_infers():
    cfg = small_cfg()
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(make_batch(with_gt=(False, False)))
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 64)}])
    assert out[0]["instances"].pred_masks.shape[1:] == (64, 64)
