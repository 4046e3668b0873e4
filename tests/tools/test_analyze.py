"""mnc_d2.tools.analyze: FLOPs (checked against fvcore's count) and parameters of MNC and of D2's Mask R-CNN, the CLI included."""
import os

import pytest
import torch

from conftest import REPO, TINY_TRAIN_NET_OPTS, small_cfg
from detectron2.modeling import build_model
from mnc_d2.tools import analyze

INSTANT = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")


def _inputs(n=2, size=(96, 128)):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand((3, *size), generator=g) * 255, "height": size[0], "width": size[1]}
            for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mnc_default", "maskrcnn"])
def test_flops_by_part_and_both_counters_agree(arch):
    opts = ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    if arch == "maskrcnn":
        opts += ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
                 "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.CONV_DIM", 16)
    cfg = small_cfg(*opts, mnc_default=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    result = analyze.count_flops(model, _inputs())
    assert result["num_inputs"] == 2 and result["detections"] > 0  # the mask heads ran on something
    parts = result["by_part"]
    mask_head = "roi_heads.final_mask_head" if arch == "mnc_default" else "roi_heads.mask_head"
    assert parts["backbone.bottom_up"] > 0 and parts[mask_head] > 0
    assert sum(parts.values()) == pytest.approx(result["eager_total"], rel=1e-6)
    from detectron2.utils.analysis import FlopCountAnalysis  # D2's analyze_model counter (traced, fvcore)

    fvcore_total = 0.0
    for one in _inputs():
        counter = FlopCountAnalysis(model, [one]).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fvcore_total += float(counter.tracer_warnings("none").total())
    assert fvcore_total / len(_inputs()) == pytest.approx(result["eager_total"], rel=0.05)  # a mean per image
    text = analyze.format_flops(result)
    assert mask_head in text and "total" in text


def test_more_detections_cost_more_head_flops():
    """The heads' count follows what they run on: fewer test detections, fewer final-mask-head FLOPs."""
    counts = {}
    for n in (2, 20):
        cfg = small_cfg("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", n, mnc_default=True)
        torch.manual_seed(0)
        counts[n] = analyze.count_flops(build_model(cfg), _inputs(1))["by_part"]
    assert counts[20]["roi_heads.final_mask_head"] > 5 * counts[2]["roi_heads.final_mask_head"]
    assert counts[20]["backbone.bottom_up"] == counts[2]["backbone.bottom_up"]


def test_cli_counts_the_instant_config_and_names_a_bad_key(capsys):
    opts = [*TINY_TRAIN_NET_OPTS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    assert analyze.main(["--config-file", INSTANT, "--num-inputs", "1", "--allow-untrained", *opts]) == 0
    out = capsys.readouterr().out
    assert "roi_heads.final_mask_head" in out and "| total" in out and "backbone" in out  # flops, parameters
    assert analyze.main(["--tasks", "parameter", "--config-file", INSTANT, "MODEL.NO_SUCH_KEY", "1"]) == 2
    assert "MODEL.NO_SUCH_KEY" in capsys.readouterr().err


def test_head_flops_at_fixed_counts():
    """benchmarks.head_flops: the same backbone and RPN cost for both models; the mask heads' cost grows
    linearly in the detections; each model's RoI heads run on its config's test RoIs (CPU configs: MNC 200,
    Mask R-CNN 300)."""
    from benchmarks.head_flops import count

    counts = count(os.path.join(REPO, "configs/mnc_R18_GN_FPN_shapes_cpu.yaml"),
                   os.path.join(REPO, "configs/benchmark/maskrcnn_R18_GN_FPN_shapes_cpu.yaml"), (64, 96), (1, 2))
    mnc, mr = counts["MNC"], counts["Mask R-CNN"]
    assert (mnc["rois"], mr["rois"]) == (200, 300) and mnc["backbone"] > 0 and mnc["rpn"] > 0
    assert mnc["backbone"] == pytest.approx(mr["backbone"]) and mnc["rpn"] == pytest.approx(mr["rpn"])
    for c in (mnc, mr):
        assert c["mask"][1] == pytest.approx(2 * c["mask"][0]) and c["mask"][0] > 0
        assert c["total"][0] == pytest.approx(c["backbone"] + c["rpn"] + c["box"] + c["mask"][0])
    assert mnc["box"] > mr["box"] > 0  # two stage-3 pathways and stage 2's mask head on 200 RoIs, one head on 300
