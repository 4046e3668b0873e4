"""Configs of format 1 (mnc_d2 0.1: ``ROI_MASK_HEAD.NAME`` = the stage-2 head, ``MNC.FINAL_MASK_HEAD.NAME`` = the
output head) still build and evaluate the model they built then. The fixture ``tests/data/legacy_v1`` holds two
run directories' ``config.yaml`` as format 1 dumped them and what ``--eval-only`` gave at that commit."""
import importlib.util
import json
import os

import pytest
import torch

from detectron2.modeling import build_model

from conftest import REPO
from mnc_d2.config import CONFIG_VERSION, upgrade_config_dict
from mnc_d2.config import build_cfg
from mnc_d2.utils.errors import ConfigError

FIXTURE = os.path.join(REPO, "tests", "data", "legacy_v1")
with open(os.path.join(FIXTURE, "expected.json")) as f:
    EXPECTED = json.load(f)
_spec = importlib.util.spec_from_file_location("make_fixture", os.path.join(FIXTURE, "make_fixture.py"))
make_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixture)


def legacy_cfg(run: str):
    return build_cfg(os.path.join(FIXTURE, run, "config.yaml"), ["MODEL.DEVICE", "cpu"])


def test_format1_dump_of_mnc_default_is_upgraded():
    mnc, mask = legacy_cfg("default").MODEL.MNC, legacy_cfg("default").MODEL.ROI_MASK_HEAD
    assert mnc.VERSION == CONFIG_VERSION
    assert mnc.MASK_HEAD.NAME == "MNCMaskHead"  # format 1's ROI_MASK_HEAD.NAME: the stage-2 head
    assert mnc.FINAL_MASK_HEAD.ENABLED and mnc.FINAL_MASK_HEAD.OWN_POOLER
    assert (mask.NAME, mask.POOLER_RESOLUTION) == ("MaskRCNNConvUpsampleHead", 14)  # format 1's FINAL_MASK_HEAD.*


def test_format1_dump_of_paper_config_is_upgraded():
    cfg = legacy_cfg("paper")
    mnc = cfg.MODEL.MNC
    assert mnc.MASK_HEAD.NAME == "MNCMaskHead" and not mnc.FINAL_MASK_HEAD.ENABLED
    assert (mnc.PATHWAY_POOL, mnc.TEST.MASK_VOTING, mnc.TEST.MASK_THRESHOLD) == (2, True, 0.4)


@pytest.mark.parametrize("run", ["default", "paper"])
def test_format1_dump_builds_the_same_modules(run):
    """The checkpoint of a format-1 run loads tensor for tensor: same names, same shapes."""
    model = build_model(legacy_cfg(run))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == EXPECTED[run]["state_dict_shapes"]


def test_partial_format1_file_keeps_format1_defaults(tmp_path):
    """A user's format-1 yaml that sets a format-1 key means format 1's defaults where it sets nothing."""
    user = tmp_path / "old.yaml"
    user.write_text(f'_BASE_: "{os.path.join(REPO, "configs", "mnc_R18_GN_FPN_shapes_cpu.yaml")}"\n'
                    'MODEL:\n  MNC:\n    FINAL_MASK_HEAD:\n      NAME: ""\n')
    mnc = build_cfg(str(user)).MODEL.MNC
    assert not mnc.FINAL_MASK_HEAD.ENABLED
    assert (mnc.TEST.MASK_VOTING, mnc.TEST.MASKS_ON_FINAL_BOXES, mnc.REFINED_MASK_LOSS, mnc.PATHWAY_POOL) == (
        True, False, False, 2)


def test_format2_dict_is_left_alone():
    config = {"MODEL": {"MNC": {"VERSION": 2, "FINAL_MASK_HEAD": {"ENABLED": False}}}}
    assert not upgrade_config_dict(config)
    assert config == {"MODEL": {"MNC": {"VERSION": 2, "FINAL_MASK_HEAD": {"ENABLED": False}}}}


def test_format1_key_on_the_command_line_names_its_replacement():
    with pytest.raises(ConfigError, match="FINAL_MASK_HEAD.NAME MaskRCNNConvUpsampleHead: a key of config format 1, replaced by "
                                          "MODEL.MNC.FINAL_MASK_HEAD.ENABLED and MODEL.ROI_MASK_HEAD.NAME"):
        build_cfg(os.path.join(REPO, "configs", "mnc_R18_GN_FPN_shapes_cpu.yaml"),
                  ["MODEL.MNC.FINAL_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"])


@pytest.mark.slow
@pytest.mark.parametrize("run", ["default", "paper"])
def test_format1_run_directory_evaluates_to_the_same_ap(run, tmp_path):
    """train_net.py --eval-only with the format-1 config.yaml and a checkpoint of that model gives the AP and the
    detections that format 1's code gave (deterministic weights: the fixture holds no 45 MB checkpoint)."""
    torch.manual_seed(0)
    model = build_model(legacy_cfg(run))
    weights_file = str(tmp_path / "model_final.pth")
    torch.save({"model": make_fixture.checkpoint_weights(model)}, weights_file)
    out = str(tmp_path / "out")
    results = make_fixture.eval_only(os.path.join(FIXTURE, run, "config.yaml"), weights_file, out)
    expected = EXPECTED[run]
    for task in ("bbox", "segm"):
        for metric, value in expected["eval"][task].items():
            assert results[task][metric] == pytest.approx(value, abs=0.02, nan_ok=True), (task, metric)
    detections, wanted = make_fixture.detections(out), expected["detections"]
    assert len(detections) == len(wanted)
    for got, want in zip(detections, wanted):
        assert got[:2] == want[:2]
        assert got[2] == pytest.approx(want[2], abs=0.05) and got[3] == pytest.approx(want[3], abs=1e-4)
        assert abs(got[4] - want[4]) <= max(2, 0.01 * want[4])  # mask area in pixels


def test_a_base_chain_that_comes_back_is_an_error(tmp_path):
    from mnc_d2.config.lazy import load_lazy_config

    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    (tmp_path / "self.yaml").write_text("_BASE_: self.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: its _BASE_ chain comes back to a file: .*a.yaml -> .*b.yaml -> "
                                          r".*a.yaml"):
        build_cfg(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="self.yaml -> .*self.yaml"):
        build_cfg(str(tmp_path / "self.yaml"))
    (tmp_path / "c.py").write_text("from .d import *\n")  # LazyConfig files that import each other
    (tmp_path / "d.py").write_text("from .c import *\n")
    with pytest.raises(ConfigError, match="c.py cannot be loaded: RecursionError"):
        load_lazy_config(str(tmp_path / "c.py"))
