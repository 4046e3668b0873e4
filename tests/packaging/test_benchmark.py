"""benchmarks/: the MNC vs Mask R-CNN benchmark. Fast checks of its configs, schedule and report
code, and one end-to-end run at ``--size tiny`` (all three models, a few iterations, 4 val images)
whose three outputs are checked for form (the numbers of such a run mean nothing)."""
import glob
import json
import os
import statistics
import subprocess
import sys

import pytest

import mnc_d2
from detectron2.config import get_cfg

from conftest import REPO  # noqa: E402
if REPO not in sys.path:  # `benchmarks` is a top-level folder of the repository, not part of the mnc_d2 package
    sys.path.insert(0, REPO)

from benchmarks import report, run_benchmark, seeds, worker  # noqa: E402

MODEL_NAMES = ("mnc3", "mnc5", "maskrcnn")


def _cfg(name, dataset="shapes", size="default"):
    """The config a worker builds for ``name`` (without default_setup)."""
    args = run_benchmark.parse_args(["--dataset", dataset, "--size", size])
    spec = run_benchmark.model_spec(name, args, "/tmp/unused")
    cfg = get_cfg()
    mnc_d2.add_mnc_config(cfg)
    cfg.merge_from_file(spec["config_file"])
    cfg.merge_from_list(spec["opts"])
    return cfg


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("dataset", ["shapes", "hela"])
@pytest.mark.parametrize("size", ["tiny", "default"])
def test_models_share_everything_but_the_roi_heads(dataset, size):
    digests = {name: worker.shared_settings_digest(_cfg(name, dataset, size)) for name in MODEL_NAMES}
    assert len(set(digests.values())) == 1, digests


def test_the_test_roi_count_is_the_one_rpn_key_a_model_may_choose():
    cfg = _cfg("maskrcnn")
    shared = worker.shared_settings_digest(cfg)
    assert (_cfg("mnc3").MODEL.RPN.POST_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (200, 300)
    cfg.defrost()
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 123
    assert worker.shared_settings_digest(cfg) == shared
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 123  # training proposals stay shared
    assert worker.shared_settings_digest(cfg) != shared


def test_model_configs_are_what_they_claim():
    mnc3, mnc5, maskrcnn = (_cfg(name) for name in MODEL_NAMES)
    assert (mnc3.MODEL.META_ARCHITECTURE, mnc3.MODEL.MNC.NUM_STAGES) == ("MNC", 3)
    assert (mnc5.MODEL.META_ARCHITECTURE, mnc5.MODEL.MNC.NUM_STAGES) == ("MNC", 5)
    assert maskrcnn.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    roi, box, mask = maskrcnn.MODEL.ROI_HEADS, maskrcnn.MODEL.ROI_BOX_HEAD, maskrcnn.MODEL.ROI_MASK_HEAD
    # Detectron2's Base-RCNN-FPN ROI settings; only the head widths are narrowed, as in the MNC CPU config
    assert (roi.NAME, roi.BATCH_SIZE_PER_IMAGE, roi.POSITIVE_FRACTION, roi.NMS_THRESH_TEST) == (
        "StandardROIHeads", 512, 0.25, 0.5)
    assert (box.NAME, box.NUM_FC, box.POOLER_RESOLUTION, box.FC_DIM) == ("FastRCNNConvFCHead", 2, 7,
                                                                         mnc3.MODEL.ROI_BOX_HEAD.FC_DIM)
    assert (mask.NAME, mask.NUM_CONV, mask.POOLER_RESOLUTION, mask.CLS_AGNOSTIC_MASK) == (
        "MaskRCNNConvUpsampleHead", 4, 14, False)
    # MNC's default: the cascade on D2's 7x7 RoI features, D2's mask head (as wide as Mask R-CNN's) on the
    # final boxes, masks not voted, D2's NMS
    mnc = mnc3.MODEL.MNC
    assert (mnc3.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, mnc.PATHWAY_POOL, mnc.MASK_HEAD.NUM_CONV) == (7, 1, 0)
    assert (mnc.MASK_HEAD.NAME, mnc.FINAL_MASK_HEAD.ENABLED, mnc.FINAL_MASK_HEAD.OWN_POOLER, mnc.REFINED_MASK_LOSS) == (
        "MNCMaskHead", True, True, True)
    assert (mnc3.MODEL.ROI_MASK_HEAD.NAME, mnc3.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION) == (mask.NAME, mask.POOLER_RESOLUTION)
    assert (mnc3.MODEL.ROI_MASK_HEAD.NUM_CONV, mnc3.MODEL.ROI_MASK_HEAD.CONV_DIM) == (mask.NUM_CONV, mask.CONV_DIM)
    assert (mnc.TEST.MASKS_ON_FINAL_BOXES, mnc.TEST.MASK_VOTING, mnc3.MODEL.ROI_HEADS.NMS_THRESH_TEST) == (
        True, False, roi.NMS_THRESH_TEST)
    paper = _cfg("paper")  # the authors' values, pinned back in the paper config
    assert (paper.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, paper.MODEL.MNC.PATHWAY_POOL,
            paper.MODEL.MNC.FINAL_MASK_HEAD.ENABLED, paper.MODEL.MNC.TEST.MASK_VOTING,
            paper.MODEL.ROI_HEADS.NMS_THRESH_TEST) == (14, 2, False, True, 0.3)
    hela = _cfg("maskrcnn", "hela")
    assert hela.MODEL.ROI_HEADS.NUM_CLASSES == 1 and hela.DATASETS.TEST == ("hela_nuclei_val",)


def test_schedule_opts():
    opts = dict(zip(*[iter(run_benchmark.schedule_opts(120, 40))] * 2))
    assert opts["SOLVER.MAX_ITER"] == "120" and opts["TEST.EVAL_PERIOD"] == "40"
    assert opts["SOLVER.STEPS"] == "(90, 110)" and int(opts["SOLVER.CHECKPOINT_PERIOD"]) > 120
    assert opts["SOLVER.WARMUP_ITERS"] == "20"
    assert run_benchmark.schedule_opts(3, 2)[3] == "(2,)"  # steps stay below MAX_ITER


def test_parse_args_defaults_and_errors(capsys):
    args = run_benchmark.parse_args([])
    assert args.models == list(MODEL_NAMES) and args.dataset == "shapes"
    assert args.out.endswith(os.path.join("benchmarks", "results", "shapes"))
    assert run_benchmark.parse_args(["--size", "tiny", "--dataset", "hela"]).out.endswith("hela_tiny")
    with pytest.raises(SystemExit):
        run_benchmark.parse_args(["--models", "mnc3,yolo"])
    with pytest.raises(SystemExit):
        run_benchmark.parse_args(["--variants", "no_voting,tta"])
    assert args.variants == list(run_benchmark.TEST_VARIANTS)
    assert run_benchmark.parse_args(["--variants", "none"]).variants == []
    ablation = run_benchmark.parse_args(["--models", "ablation"]).models
    assert ablation == ["mnc3", "mnc3_bg", "mnc5", "mnc5_bg", "maskrcnn"]
    spec = run_benchmark.model_spec("mnc3", run_benchmark.parse_args(["--variants", "no_voting"]), "/tmp/unused")
    assert spec["test_variants"] == {"no_voting": ["MODEL.MNC.TEST.MASK_VOTING", "False"]}


def test_box_gradient_models():
    for name, stages in (("mnc3_bg", 3), ("mnc5_bg", 5)):
        cfg = _cfg(name)
        assert cfg.MODEL.MNC.BOX_GRADIENTS.ENABLED and cfg.MODEL.MNC.NUM_STAGES == stages
        assert worker.shared_settings_digest(cfg) == worker.shared_settings_digest(_cfg("maskrcnn"))
    assert not _cfg("mnc3").MODEL.MNC.BOX_GRADIENTS.ENABLED


# ---------------------------------------------------------------------------------------- worker helpers
def test_learning_curve_counts_iterations_done():
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        # eval period 2, max_iter 4: EvalHook stores the periodic result at step index 1, the final at 4
        for it, ap in ((1, float("nan")), (4, 5.0)):
            storage.iter = it
            storage.put_scalars(**{"segm/AP": ap, "bbox/AP": 2 * ap}, smoothing_hint=False)
    curve = worker.learning_curve(storage, max_iter=4)
    assert [p["iter"] for p in curve] == [2, 4]
    assert curve[0]["segm"]["AP"] == 0.0 and curve[0]["no_predictions"]  # D2's NaN for "no predictions"
    assert "no_predictions" not in curve[1]
    assert curve[1]["segm"]["AP"] == 5.0 and curve[1]["bbox"]["AP"] == 10.0


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_peak_memory_resets():
    import numpy as np

    memory = worker.PeakMemory("cpu")
    if not memory.resettable:
        assert memory.method == "rss_ru_maxrss"
        pytest.skip("this kernel ignores writes to /proc/self/clear_refs")
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    peak_with_block = memory.peak_mb()
    assert peak_with_block >= worker.PeakMemory._status_mb("VmRSS") - 1
    del block
    memory.reset()
    assert memory.resettable and memory.method == "rss_vmhwm"
    rss = worker.PeakMemory._status_mb("VmRSS")
    assert memory.peak_mb() <= rss + worker.PeakMemory.RESET_SLACK_MB
    if rss < peak_with_block - 48:  # the allocator gave the block back to the kernel
        assert memory.peak_mb() < peak_with_block - 32


def test_peak_memory_falls_back_when_reset_is_ignored(monkeypatch):
    """A kernel that accepts the clear_refs write but keeps the peak: fall back to ru_maxrss."""
    monkeypatch.setattr(worker.PeakMemory, "_clear_refs", classmethod(lambda cls: True))
    memory = worker.PeakMemory("cpu")
    assert memory.resettable
    monkeypatch.setattr(worker.PeakMemory, "_clear_refs", classmethod(lambda cls: False))
    memory.reset()
    assert not memory.resettable and memory.method == "rss_ru_maxrss"
    assert memory.peak_mb() > 0


# ---------------------------------------------------------------------------------------- report
def _fake_result(name, s_iter, s_img, peak, ap, status="ok"):
    if status != "ok":
        return {"name": name, "label": name, "status": status, "message": "boom"}
    point = {"segm": {"AP": ap, "AP50": ap + 10, "AP75": ap - 1}, "bbox": {"AP": ap + 1, "AP50": None, "AP75": 0.0}}
    return {"name": name, "label": name, "status": "ok",
            "train": {"s_per_iter": {"median": s_iter}, "cpu_s_per_iter": {"median": 2 * s_iter}},
            "inference": {"s_per_image": {"median": s_img}},
            "memory": {"method": "rss_vmhwm", "train_peak_mb": peak, "inference_peak_mb": peak / 2},
            "eval": {"curve": [{"iter": 5, **point}, {"iter": 10, **point}], "final": point}}


FAKE_META = {"dataset": "shapes", "size": "tiny", "command": "python -m benchmarks.run_benchmark", "threads": 2,
             "started": "now", "backbone": "R18", "iters": 10, "ims_per_batch": 2, "train_dataset": "a",
             "val_dataset": "b", "num_val_images": 4, "eval_period": 5, "seed": 1, "git": "abc", "device": "cpu",
             "host": {"device_name": "cpu"}}


def test_compare_ratios_and_targets():
    models = {"mnc3": _fake_result("mnc3", 1.1, 0.5, 110, 20.0), "mnc5": _fake_result("mnc5", 2.0, 0.56, 100, 19.0),
              "maskrcnn": _fake_result("maskrcnn", 1.0, 0.5, 100, 19.5)}
    cmp_ = report.compare(models)
    assert set(cmp_) == {"mnc3", "mnc5"}
    assert cmp_["mnc3"]["train_time_ratio"] == 1.1 and cmp_["mnc3"]["segm_ap_diff"] == 0.5
    assert cmp_["mnc3"]["all_pass"] is True
    # time targets are judged on quiet --time-only invocations, not on a training run's report
    assert cmp_["mnc5"]["pass"] == {"memory_ratio": True, "segm_ap_diff": False}
    assert cmp_["mnc5"]["inference_time_ratio"] == pytest.approx(1.12) and cmp_["mnc5"]["train_time_ratio"] == 2.0
    assert report.compare({"mnc3": models["mnc3"]}) == {}  # no baseline, no ratios


def test_write_outputs_with_a_skipped_model(tmp_path):
    models = {"mnc3": _fake_result("mnc3", 1.1, 0.5, 110, float("nan")),
              "mnc5": _fake_result("mnc5", 0, 0, 0, 0, status="skipped"),
              "maskrcnn": _fake_result("maskrcnn", 1.0, 0.5, 100, 19.5)}
    paths = report.write_outputs(str(tmp_path), FAKE_META, models)
    data = json.loads(open(paths["json"]).read())  # strict JSON: the NaN became null
    assert data["models"]["mnc3"]["eval"]["final"]["segm"]["AP"] is None
    assert data["comparison"]["mnc3"]["pass"]["segm_ap_diff"] is None
    text = open(paths["markdown"]).read()
    assert "skipped: boom" in text and "n/a" in text
    assert os.path.getsize(paths["figure"]) > 10_000


def _fake_seeds():
    """Seeds 2 and 3: mnc3 ahead of Mask R-CNN by 2.0 and 1.0 AP; mnc5 diverged on seed 3."""
    return {2: {"mnc3": _fake_result("mnc3", 1.0, 0.6, 110, 22.0), "mnc5": _fake_result("mnc5", 2.0, 0.9, 100, 30.0),
                "maskrcnn": _fake_result("maskrcnn", 1.0, 0.5, 100, 20.0)},
            3: {"mnc3": _fake_result("mnc3", 1.2, 0.6, 110, 24.0), "mnc5": _fake_result("mnc5", 0, 0, 0, 0, "failed"),
                "maskrcnn": _fake_result("maskrcnn", 1.0, 0.5, 100, 23.0)}}


def test_seeds_summary_mean_std_and_ratios_of_the_means(tmp_path):
    per_seed = _fake_seeds()
    metas = {s: dict(FAKE_META, seed=s, command=f"python -m benchmarks.run_benchmark --seed {s}") for s in per_seed}
    paths = seeds.write_outputs(str(tmp_path), metas, per_seed)
    data = json.loads(open(paths["json"]).read())
    assert data["benchmark"]["seeds"] == [2, 3]
    mnc3, base = data["models"]["mnc3"], data["models"]["maskrcnn"]
    assert mnc3["mean"]["segm_AP"] == pytest.approx(23.0) and mnc3["std"]["segm_AP"] == pytest.approx(2 ** 0.5)
    assert base["mean"]["segm_AP"] == pytest.approx(21.5)
    assert data["models"]["mnc5"]["status"] == "failed" and "seed 3" in data["models"]["mnc5"]["message"]
    cmp_ = data["comparison"]["mnc3"]
    assert cmp_["segm_ap_diff"] == pytest.approx(1.5) and cmp_["train_time_ratio"] == pytest.approx(1.1)
    assert cmp_["segm_ap_diff_per_seed"]["mean"] == pytest.approx(1.5)
    assert cmp_["segm_ap_diff_per_seed"]["std"] == pytest.approx(0.5 ** 0.5)
    assert cmp_["segm_ap_spread"] == pytest.approx(base["std"]["segm_AP"])  # the larger std: Mask R-CNN's 2.12
    assert cmp_["segm_ap_diff_exceeds_spread"] is False  # 1.5 < 2.12: not a result
    assert set(cmp_["pass"]) == {"memory_ratio", "segm_ap_diff"}  # no time verdicts from training runs
    assert "mnc5" not in data["comparison"]
    text = open(paths["markdown"]).read()
    assert "23.0 ± 1.4" in text and "22.0 / 24.0" in text and "seed 3: failed" in text
    assert seeds.main([str(tmp_path)]) == 1  # no seed*/benchmark.json to rebuild from
    one = seeds.build({2: metas[2]}, {2: per_seed[2]})["comparison"]["mnc3"]
    assert one["segm_ap_diff"] == pytest.approx(2.0) and one["segm_ap_diff_exceeds_spread"] is None  # no spread


def test_seeds_arguments():
    args = run_benchmark.parse_args(["--seeds", "2,3,4", "--out", "/tmp/x"])
    assert args.seeds == [2, 3, 4]
    assert run_benchmark.parse_args([]).seeds == []
    with pytest.raises(SystemExit):
        run_benchmark.parse_args(["--seeds", "2,x"])
    with pytest.raises(SystemExit):
        run_benchmark.parse_args(["--seeds", "2,3", "--time-only"])
    for wrong in (["--rounds", "3"], ["--time-only", "--rounds", "0"]):  # rounds of --time-only only, at least 1
        with pytest.raises(SystemExit):
            run_benchmark.parse_args(wrong)
    assert run_benchmark._one_seed_command(["--seeds", "2,3", "--out", "/o", "--models", "mnc3"], 3, "/o/seed3") == [
        "--models", "mnc3", "--seed", "3", "--out", "/o/seed3"]
    # KEY VALUE options stay last: the runner refuses flags after them, so the recorded command must run as printed
    command = ["--seeds", "2,3", "--models", "mnc3", "--out", "/o", "MODEL.MNC.SEGMENT_GATING", "True"]
    one_seed = run_benchmark._one_seed_command(command, 2, "/o/seed2", num_opts=2)
    assert one_seed == ["--models", "mnc3", "--seed", "2", "--out", "/o/seed2", "MODEL.MNC.SEGMENT_GATING", "True"]
    assert run_benchmark.parse_args(one_seed).opts == ["MODEL.MNC.SEGMENT_GATING", "True"]


# ---------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark_tiny")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_benchmark", "--size", "tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    # exit status 1 = some model failed (e.g. five-stage training diverged); the outputs must exist anyway
    assert proc.returncode in (0, 1) and (out / "benchmark.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_tiny_run_json(tiny_run):
    out, _ = tiny_run
    data = json.loads((out / "benchmark.json").read_text())
    assert {"benchmark", "targets", "baseline", "models", "comparison"} <= set(data)
    assert data["benchmark"]["size"] == "tiny" and data["benchmark"]["same_shared_settings"] is True
    assert list(data["models"]) == list(MODEL_NAMES)
    for name, result in data["models"].items():
        if name == "mnc5" and result["status"] != "ok":  # reported, not hidden: not buildable, or diverged
            assert result["status"] in ("skipped", "failed") and result["message"]
            continue
        assert result["status"] == "ok", result
        assert result["train"]["s_per_iter"]["median"] > 0 and result["train"]["timed_iters"] >= 1
        assert result["inference"]["s_per_image"]["median"] > 0 and result["inference"]["num_images"] == 4
        assert result["memory"]["train_peak_mb"] > result["memory"]["baseline_mb"] > 0
        assert [p["iter"] for p in result["eval"]["curve"]] == [2, 3]
        for task in ("segm", "bbox"):
            assert set(result["eval"]["final"][task]) == {"AP", "AP50", "AP75"}
        if name.startswith("mnc"):  # test-time variants, evaluated and timed on the same weights
            assert set(result["variants"]) == set(run_benchmark.TEST_VARIANTS)
            for variant in result["variants"].values():
                assert set(variant["eval"]["segm"]) == {"AP", "AP50", "AP75"}
                assert variant["inference"]["s_per_image"]["median"] > 0
        else:
            assert "variants" not in result
    assert "mnc3" in data["comparison"]
    assert set(data["comparison"]["mnc3"]["pass"]) == set(report.JUDGED_TARGETS)


@pytest.mark.slow
def test_tiny_run_markdown(tiny_run):
    out, stdout = tiny_run
    text = (out / "benchmark.md").read_text()
    main_table = text.split("## Targets")[0]
    for name in MODEL_NAMES:
        assert sum(f"(`{name}`)" in line and line.startswith("|") for line in main_table.splitlines()) == 1, name
    assert "## Targets" in text and "## Learning curve" in text
    # the ablation table: each MNC model as configured, then one row per test-time variant
    ablation = text.split("## Ablation")[1]
    for name in ("mnc3", "mnc5"):
        rows = [line for line in ablation.splitlines() if f"(`{name}`)" in line]
        assert len(rows) == 1 + len(run_benchmark.TEST_VARIANTS), rows
    assert "MODEL.MNC.TEST.MASK_VOTING False" in ablation
    assert "[bench]" in stdout  # progress was printed


@pytest.mark.slow
def test_tiny_run_figure(tiny_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    out, _ = tiny_run
    image = matplotlib.image.imread(str(out / "benchmark.png"))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0  # not blank
    assert (out / "runs" / "mnc3" / "config.yaml").exists()
    assert not list((out / "runs").glob("*/model_final.pth"))  # checkpoints removed unless --keep-checkpoints


@pytest.mark.slow
def test_tiny_run_over_two_seeds(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_benchmark", "--size", "tiny", "--models", "maskrcnn",
                           "--seeds", "1,2", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "benchmark.json").read_text())
    per_seed = [json.loads((tmp_path / f"seed{s}" / "benchmark.json").read_text()) for s in (1, 2)]
    assert data["benchmark"]["seeds"] == [1, 2] and [r["benchmark"]["seed"] for r in per_seed] == [1, 2]
    assert "--seed 2 --out" in per_seed[1]["benchmark"]["command"]
    aps = [r["models"]["maskrcnn"]["eval"]["final"]["segm"]["AP"] for r in per_seed]
    assert data["models"]["maskrcnn"]["mean"]["segm_AP"] == pytest.approx(sum(aps) / 2)


@pytest.mark.slow
def test_budget_skips_the_models_not_started_in_time(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_benchmark", "--size", "tiny", "--models",
                           "maskrcnn,mnc3", "--variants", "none", "--budget-s", "1", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = json.loads((tmp_path / "benchmark.json").read_text())["models"]
    assert models["maskrcnn"]["status"] == "ok"  # started at once
    assert models["mnc3"]["status"] == "skipped" and "--budget-s 1" in models["mnc3"]["message"]


# ---------------------------------------------------------------------------------------- inference profile
@pytest.mark.parametrize("slow", [False, True], ids=["fast_paths", "slow_paths"])
def test_profile_inference_cli(tmp_path, capsys, slow):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from benchmarks import profile_inference
    from mnc_d2.config import build_cfg

    config = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")
    model = build_model(build_cfg(config))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    argv = ["--config-file", config, "--weights", str(tmp_path / "model.pth"), "--images", "2", "--warmup", "1"]
    assert profile_inference.main(argv + (["--slow-paths"] if slow else [])) == 0
    text = capsys.readouterr().out
    for part in ("model([image])", "backbone", "rpn", "roi_heads.stage2.roi_pooler", "roi_heads.stage2.mask_head",
                 "roi_heads.stage3", "postprocess"):
        assert part in text, text
    assert ("slow paths" in text) == slow


def test_resume_reuses_only_finished_results_of_the_same_spec(tmp_path):
    args = run_benchmark.parse_args(["--out", str(tmp_path)])
    spec = run_benchmark.model_spec("mnc3", args, str(tmp_path / "runs" / "mnc3"))
    os.makedirs(spec["work_dir"])
    assert run_benchmark.reusable_result(spec) is None  # nothing saved
    with open(os.path.join(spec["work_dir"], "spec.json"), "w") as f:
        json.dump(spec, f)
    ok = _fake_result("mnc3", 1.0, 0.2, 100, 20.0)
    diverged = dict(ok, status="failed", message="training failed at iteration 34: NonFiniteError: Non-finite loss")
    with open(spec["result_file"], "w") as f:
        json.dump(diverged, f)
    assert run_benchmark.reusable_result(spec) is None
    assert run_benchmark.reusable_result(spec, diverged_too=True)["status"] == "failed"  # --keep-diverged
    for result, expected in ((dict(ok, status="failed"), None), (ok, "ok")):
        with open(spec["result_file"], "w") as f:
            json.dump(result, f)
        reused = run_benchmark.reusable_result(spec)
        assert (reused and reused["status"]) == expected
    assert reused["reused"] is True
    other = run_benchmark.model_spec("mnc3", run_benchmark.parse_args(["--out", str(tmp_path), "--seed", "2"]),
                                     spec["work_dir"])
    assert run_benchmark.reusable_result(other) is None  # another seed: rerun

    moved = tmp_path / "elsewhere"  # the --out folder committed, or moved: its finished results still count
    os.makedirs(moved / "runs" / "mnc3")
    saved = json.loads(json.dumps(spec).replace(str(tmp_path), str(moved)).replace(run_benchmark.REPO, "/old/clone"))
    for name, content in (("spec.json", saved), ("result.json", ok)):
        with open(moved / "runs" / "mnc3" / name, "w") as f:
            json.dump(content, f)
    here = run_benchmark.model_spec("mnc3", run_benchmark.parse_args(["--out", str(moved)]), str(moved / "runs" / "mnc3"))
    assert run_benchmark.reusable_result(here)["status"] == "ok"


def test_resume_retrains_a_run_whose_resolved_config_changed(tmp_path, capsys):
    """Same spec (config file + opts), but a default or the config file changed since: not reused."""
    args = run_benchmark.parse_args(["--out", str(tmp_path), "--iters", "7"])
    spec = run_benchmark.model_spec("mnc3", args, str(tmp_path / "runs" / "mnc3"))
    os.makedirs(spec["work_dir"])
    with open(os.path.join(spec["work_dir"], "spec.json"), "w") as f:
        json.dump(spec, f)
    snapshot = run_benchmark.resolved_config(spec)
    assert snapshot["SOLVER.MAX_ITER"] == 7 and "OUTPUT_DIR" not in snapshot
    assert snapshot["MODEL.MNC.FINAL_MASK_HEAD.ENABLED"] is True  # MNC's default
    ok = _fake_result("mnc3", 1.0, 0.2, 100, 20.0)
    cases = (
        (snapshot, True),  # unchanged
        (dict(snapshot, **{"MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.3}), False),  # trained under an older default
        ({k: v for k, v in snapshot.items() if k != "MODEL.MNC.REFINED_MASK_LOSS"}, True),  # a key added since
    )
    for saved, reused in cases:
        with open(spec["result_file"], "w") as f:
            json.dump(dict(ok, config=saved), f)
        assert (run_benchmark.reusable_result(spec) is not None) == reused
    assert "MODEL.ROI_HEADS.NMS_THRESH_TEST" in capsys.readouterr().out  # says why it retrains
    # with the final weights kept: a test-time change re-evaluates them, any other change still retrains
    open(os.path.join(spec["work_dir"], "model_final.pth"), "w").close()
    for changed, action in (({"MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.3}, ["MODEL.ROI_HEADS.NMS_THRESH_TEST"]),
                            ({"MODEL.MNC.TEST.MASK_VOTING": True}, ["MODEL.MNC.TEST.MASK_VOTING"]),
                            ({"MODEL.MNC.REFINED_MASK_LOSS": False}, None), ({"TEST.EVAL_PERIOD": 3}, None)):
        with open(spec["result_file"], "w") as f:
            json.dump(dict(ok, config=dict(snapshot, **changed)), f)
        reused = run_benchmark.reusable_result(spec)
        assert (reused and reused["reevaluate"]) == action
    mask_rcnn = {"MODEL.META_ARCHITECTURE": "GeneralizedRCNN", "MODEL.MNC.NUM_STAGES": 3, "SEED": 1}
    assert run_benchmark.config_changes(mask_rcnn, dict(mask_rcnn, **{"MODEL.MNC.NUM_STAGES": 5})) == []
    assert run_benchmark.config_changes(mask_rcnn, dict(mask_rcnn, SEED=2)) == ["SEED"]


def _format2_opts(opts):
    """Command-line options of config format 1 in format 2 (the mask-head keys some ablation variants set)."""
    out = []
    for key, value in zip(opts[0::2], opts[1::2]):
        out += {"MODEL.ROI_MASK_HEAD.NAME": ["MODEL.MNC.MASK_HEAD.NAME", value],
                "MODEL.MNC.FINAL_MASK_HEAD.NAME": ["MODEL.MNC.FINAL_MASK_HEAD.ENABLED", str(bool(value)),
                                                   "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER", "False",
                                                   "MODEL.ROI_MASK_HEAD.NAME", value],
                "MODEL.MNC.FINAL_MASK_HEAD.POOLER_RESOLUTION": ["MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER", str(value != "0"),
                                                                "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", value],
                }.get(key, [key, value])
    return out


def test_committed_ablation_runs_still_resolve_to_the_config_they_were_trained_with():
    """MNC's default changed after the ablation was trained (Base-MNC.yaml); the paper config pins the
    reference values back, so every committed ablation run still matches its config and --resume reuses it."""
    files = glob.glob(os.path.join(REPO, "docs", "benchmarks", "ablation", "*", "benchmark.json"))
    checked = 0
    for path in files:  # the aggregates keep each model's config file, options and resolved config
        with open(path) as f:
            models = json.load(f)["models"]
        for name, result in models.items():
            if "config" not in result:  # a diverged run, saved without its config
                continue
            spec = {"config_file": os.path.join(REPO, "configs", result["config_file"].split("configs/", 1)[1]),
                    "opts": _format2_opts(result["opts"])}
            assert run_benchmark.config_changes(result["config"], run_benchmark.resolved_config(spec)) == [], \
                (path, name)
            checked += 1
    assert checked >= 20


def test_worker_config_snapshot_round_trips_through_json():
    from conftest import small_cfg

    cfg = small_cfg("OUTPUT_DIR", "/somewhere")
    snapshot = worker.config_snapshot(cfg)
    assert "OUTPUT_DIR" not in snapshot
    assert snapshot["INPUT.MIN_SIZE_TRAIN"] == list(cfg.INPUT.MIN_SIZE_TRAIN)  # a tuple, as JSON reads it back
    assert json.loads(json.dumps(snapshot)) == snapshot


# ---------------------------------------------------------------------------------------- --time-only, ablation
@pytest.mark.slow
def test_time_only_retimes_saved_weights_and_the_ablation_table_reads_both(tmp_path):
    from benchmarks import ablation

    out = tmp_path / "bench"
    common = [sys.executable, "-m", "benchmarks.run_benchmark", "--size", "tiny", "--out", str(out),
              "--models", "mnc3,maskrcnn", "--variants", "no_voting"]
    proc = subprocess.run([*common, "--keep-checkpoints"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    training_spec = (out / "runs" / "mnc3" / "spec.json").read_text()
    # a run made in another clone: --time-only reads the config file of this checkout, not that clone's
    spec_file = out / "runs" / "maskrcnn" / "spec.json"
    moved = json.loads(spec_file.read_text())
    config_file = moved["config_file"]
    moved["config_file"] = "/another/clone/configs/" + config_file.partition("/configs/")[2]
    spec_file.write_text(json.dumps(moved))
    proc = subprocess.run([*common, "--time-only", "--timing-iters", "2", "--rounds", "3",
                           "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timing = json.loads((out / "timing.json").read_text())
    for name in ("mnc3", "maskrcnn"):
        result = timing["models"][name]
        assert result["status"] == "ok", result
        assert result["train"]["timed_iters"] == 2 and result["train"]["s_per_iter"]["median"] > 0
        rounds = result["inference"]["round_medians"]  # --rounds 3: the first round's median, then two more
        assert len(rounds) == 3 and rounds[0] == result["inference"]["first_round_s_per_image"]["median"]
        assert result["inference"]["s_per_image"]["median"] == round(statistics.median(rounds), 5) > 0
        assert 0 < result["flops"]["num_inputs"] <= 5 and result["flops"]["gflops_per_image"] > 0  # --flop-images
    assert set(timing["models"]["mnc3"]["variants"]) == {"no_voting"}
    assert (out / "runs" / "mnc3" / "spec.json").read_text() == training_spec  # --resume still matches
    timed = json.loads((out / "runs" / "mnc3" / "timing_spec.json").read_text())["opts"]
    assert timed[-2:] == ["MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", "0"]  # the command line's opts apply on top
    assert json.loads((out / "runs" / "maskrcnn" / "timing_spec.json").read_text())["config_file"] == config_file
    assert not (out / "runs" / "mnc3" / "timing" / "model_final.pth").exists()  # nothing saved
    text = (out / "timing.md").read_text()
    assert "| mnc3 |" in text and "| mnc3 [no_voting] |" in text and "GFLOPs/img" in text and "3 rounds" in text
    order = [line.split(": ")[1] for line in proc.stdout.splitlines() if line.startswith("[bench] round ")]
    assert order == ["maskrcnn", "mnc3", "mnc3", "maskrcnn"]  # the order reversed every other round
    per_round = [a / b for a, b in zip(*(timing["models"][m]["inference"]["round_medians"] for m in ("mnc3", "maskrcnn")))]
    mnc3_line = [line for line in text.splitlines() if line.startswith("| mnc3 |")][0]
    assert f"({min(per_round):.2f}-{max(per_round):.2f})" in mnc3_line
    flops = timing["models"]["mnc3"]["flops"]["gflops_per_image"] / timing["models"]["maskrcnn"]["flops"]["gflops_per_image"]
    assert f"| {flops:.2f} |" in [line for line in text.splitlines() if line.startswith("| mnc3 |")][0]

    table = ablation.markdown([str(out)])
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 3  # mnc3, its variant, maskrcnn
    maskrcnn_row = [r for r in rows if r.startswith("| `maskrcnn`")][0]
    assert maskrcnn_row.rstrip(" |").endswith("1.00")  # its own train-time ratio

    # --resume after a test-time default changed (here: pretend mnc3 was trained under another
    # POST_NMS_TOPK_TEST): the kept weights are evaluated again, the training is not repeated
    result_file = out / "runs" / "mnc3" / "result.json"
    saved = json.loads(result_file.read_text())
    current = saved["config"]["MODEL.RPN.POST_NMS_TOPK_TEST"]
    saved["config"]["MODEL.RPN.POST_NMS_TOPK_TEST"] = current + 7
    result_file.write_text(json.dumps(saved))
    proc = subprocess.run([*common, "--keep-checkpoints", "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mnc3: re-evaluating its final weights" in proc.stdout and "maskrcnn: reusing its result" in proc.stdout
    again = json.loads(result_file.read_text())
    assert again["reevaluated"]["changed"] == ["MODEL.RPN.POST_NMS_TOPK_TEST"]
    assert again["config"]["MODEL.RPN.POST_NMS_TOPK_TEST"] == current
    assert again["train"] == saved["train"] and again["eval"]["curve"][-1]["segm"] == again["eval"]["final"]["segm"]
    assert set(again["variants"]) == {"no_voting"} and again["inference"]["s_per_image"]["median"] > 0
    assert not (out / "runs" / "mnc3" / "reevaluated" / "model_final.pth").exists()
    # --variants none: each model as configured only, whatever variants were trained
    proc = subprocess.run([*common, "--time-only", "--timing-iters", "1", "--variants", "none"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "timing.json").read_text())["models"]["mnc3"]["variants"] == {}
    assert "[no_voting]" not in (out / "timing.md").read_text()


def test_seed_table_shows_ap_or_where_training_diverged(tmp_path):
    from benchmarks import ablation

    for seed, paper in ((1, _fake_result("paper", 1.0, 0.2, 100, 61.5)),
                        (2, dict(_fake_result("paper", 1.0, 0.2, 100, 0.0), status="failed",
                                 message="training failed at iteration 48: NonFiniteError: Non-finite gradient"))):
        os.makedirs(tmp_path / str(seed))
        bench = {"benchmark": dict(FAKE_META, seed=seed), "models": {"paper": paper}}
        (tmp_path / str(seed) / "benchmark.json").write_text(json.dumps(bench))
    table = ablation.seeds_markdown([str(tmp_path / "1"), str(tmp_path / "2")])
    assert "| `paper` | 61.5 | diverged at iteration 48 |" in table



def test_retrain_table_shows_how_far_each_model_and_its_difference_to_paper_moved(tmp_path):
    from benchmarks import ablation

    def with_variant(result, ap):
        return dict(result, variants={"final_boxes_no_voting": {"opts": [], "eval": {"segm": {"AP": ap}}}})

    runs = {2: {"paper": with_variant(_fake_result("paper", 1, 1, 1, 20.0), 21.0),
                "paper_x": dict(_fake_result("paper_x", 1, 1, 1, 0.0), status="failed",
                                message="training failed at iteration 40: NonFiniteError: Non-finite gradient"),
                "maskrcnn": _fake_result("maskrcnn", 1, 1, 1, 18.0)},
            1: {"paper": with_variant(_fake_result("paper", 1, 1, 1, 22.5), 23.0),
                "paper_x": with_variant(_fake_result("paper_x", 1, 1, 1, 21.0), 24.5),
                "maskrcnn": _fake_result("maskrcnn", 1, 1, 1, 17.0)}}
    for threads, models in runs.items():
        os.makedirs(tmp_path / str(threads))
        bench = {"benchmark": dict(FAKE_META, threads=threads, wall_s=60), "models": models}
        (tmp_path / str(threads) / "benchmark.json").write_text(json.dumps(bench))
    table = ablation.retrain_markdown(str(tmp_path / "2"), str(tmp_path / "1"))
    assert "2 threads (A) against 1 thread (B)" in table
    assert "| `paper` | 20.0 | 22.5 | +2.5 | +0.0 | +0.0 | 21.0 | 23.0 |" in table
    assert "| `paper_x` | diverged at iteration 40 | 21.0 | – | – | -1.5 | – | 24.5 |" in table
    assert "| `maskrcnn` | 18.0 | 17.0 | -1.0 | -2.0 | -5.5 | – | – |" in table
    assert "## shapes: 10 iterations, seed 1, 2 threads, 4 val images" in ablation.markdown([str(tmp_path / "2")])
    assert "seed 1, 1 thread, 4 val images" in ablation.markdown([str(tmp_path / "1")])


def test_failed_seeds_are_summed_up_in_a_few_words(tmp_path):
    """A model that diverged on some seeds shows where, not the whole error, in the seeds table and the README's."""
    from benchmarks import readme_tables

    long = ("training failed at iteration 78: NonFiniteError: Non-finite values at iteration 78: Predicted boxes or "
            "scores contain Inf/NaN. Training has diverged. No update was applied ... resume with --resume.")
    per_seed = _fake_seeds()
    per_seed[2]["mnc5"] = dict(_fake_result("mnc5", 0, 0, 0, 0, "failed"), message=long)
    metas = {s: dict(FAKE_META, seed=s, command=f"python -m benchmarks.run_benchmark --seed {s}") for s in per_seed}
    paths = seeds.write_outputs(str(tmp_path), metas, per_seed)
    row = next(line for line in open(paths["markdown"]).read().splitlines() if "(`mnc5`)" in line)
    assert "seed 2: diverged at iteration 78; seed 3: failed (boom)" in row and "No update" not in row
    assert json.load(open(paths["json"]))["models"]["mnc5"]["message"].count(long) == 1  # the json keeps it all
    readme = tmp_path / "README.md"
    readme.write_text(f"{readme_tables.BEGIN}\n{readme_tables.END}\n")
    assert readme_tables.main(["--compact", str(readme), str(tmp_path)]) == 0
    row = next(line for line in readme.read_text().splitlines() if "`mnc5`" in line)
    assert "seed 2: diverged at iteration 78; seed 3: failed (boom)" in row and "No update" not in row
    assert report.failure_cell({"status": "failed", "message": "worker exited with code 9 without a result"}) == \
        "failed (worker exited with code 9 without a result)"


# ---------------------------------------------------------------------------------------- README tables
def test_readme_headline_block_is_regenerated_from_the_files(tmp_path):
    from benchmarks import readme_tables

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nkept\n{readme_tables.BEGIN}\nstale table\n{readme_tables.END}\nkept too\n")
    folder = os.path.join(REPO, "docs", "benchmarks", "defaults", "hela_seed1")  # one seed + timing.json
    assert readme_tables.main([str(readme), folder]) == 0
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("# title\nkept\n") and text.endswith("kept too\n")
    block = text.split(readme_tables.BEGIN)[1].split(readme_tables.END)[0]
    assert "`maskrcnn`" in block and "Timing: hela" in block and "\n# " not in block  # demoted headings
    assert readme_tables.main([str(readme), str(tmp_path / "nothing")]) == 1
    (tmp_path / "plain.md").write_text("no markers\n")
    assert readme_tables.main([str(tmp_path / "plain.md"), folder]) == 1


def test_readme_compact_table_with_quiet_timing_ratios(tmp_path):
    """--compact: one row per model of each seeds folder, with the ratios of the folder's timing.json."""
    import shutil

    from benchmarks import readme_tables, report

    folder = tmp_path / "shapes"
    shutil.copytree(os.path.join(REPO, "docs", "benchmarks", "headline", "shapes"), folder)
    timing = json.load(open(os.path.join(REPO, "docs", "benchmarks", "defaults", "hela_seed1", "timing.json")))
    timing["models"]["mnc3"] = timing["models"].pop("mnc3_fast")
    (folder / "timing.json").write_text(json.dumps(timing))
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{readme_tables.BEGIN}\nold\n{readme_tables.END}\n")
    assert readme_tables.main(["--compact", str(readme), str(folder)]) == 0
    block = readme.read_text().split(readme_tables.BEGIN)[1]
    row = next(line for line in block.splitlines() if "`mnc3`" in line).split(" | ")
    models = timing["models"]
    expected = report.inference_s_per_image(models["mnc3"]) / report.inference_s_per_image(models["maskrcnn"])
    assert row[6] == f"{expected:.2f}" and "old" not in block and "--time-only" in block
    summary = json.load(open(folder / "benchmark.json"))["models"]["mnc3"]
    assert row[2] == f"{summary['mean']['segm_AP']:.1f} ± {summary['std']['segm_AP']:.1f}"


def test_resume_reads_a_format1_snapshot_as_todays_config(tmp_path):
    """Runs trained under config format 1 (ROI_MASK_HEAD.NAME = the stage-2 head) are not retrained for the rename."""
    args = run_benchmark.parse_args(["--out", str(tmp_path), "--iters", "7"])
    current = run_benchmark.resolved_config(run_benchmark.model_spec("mnc3", args, str(tmp_path / "mnc3")))
    old = {k: v for k, v in current.items() if k not in (
        "MODEL.MNC.VERSION", "MODEL.MNC.MASK_HEAD.NAME", "MODEL.MNC.FINAL_MASK_HEAD.ENABLED",
        "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER")}
    old.update({"MODEL.ROI_MASK_HEAD.NAME": "MNCMaskHead", "MODEL.MNC.FINAL_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
                "MODEL.MNC.FINAL_MASK_HEAD.POOLER_RESOLUTION": 14})
    assert run_benchmark.config_changes(old, current) == []
    assert run_benchmark.config_changes(dict(old, **{"MODEL.MNC.FINAL_MASK_HEAD.NAME": ""}), current) == [
        "MODEL.MNC.FINAL_MASK_HEAD.ENABLED"]


def test_two_keys_cost_report_states_ratios_verdicts_and_rounds_above_target(tmp_path):
    from benchmarks import two_keys_cost

    times = {"maskrcnn": [2.0, 2.0, 2.0], "mnc_1000": [2.2, 2.6, 2.1]}
    inference = two_keys_cost.ratios(times)
    assert inference["mnc_1000"]["ratio"] == pytest.approx(2.2 / 2.0)
    assert inference["mnc_1000"]["ratio_range"] == pytest.approx([1.05, 1.3])
    result = {"models": {"maskrcnn": {"label": "MR", "test_proposals": 1000, "proposals": 1000, "detections": 100,
                                      "gflops": 100.0},
                         "mnc_1000": {"label": "MNC", "test_proposals": 1000, "proposals": 1000, "detections": 100,
                                      "gflops": 125.0}},
              "threads": [2], "inference": {"2": inference}, "training": two_keys_cost.ratios(times),
              "targets": {"flops": 1.2, "inference": 1.15, "train": 1.2}, "size": 800, "threads_note": "3 rounds",
              "command": "python -m benchmarks.two_keys_cost --out X"}
    (tmp_path / "results.json").write_text(json.dumps(result))
    assert two_keys_cost.main(["--out", str(tmp_path), "--render"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| MNC | 1000 (1000) | 100 | 125.0 (1.25) | 2.20 (1.10, 1.05-1.30) | 2.20 (1.10, 1.05-1.30) |" in text
    assert "FLOPs 1.25× (misses ≤ 1.2×)" in text and "inference at 2 thread(s) 1.10× (meets ≤ 1.15×; rounds up to 1.30×)" in text
    assert "Generated by `python -m benchmarks.two_keys_cost --out X`" in text


@pytest.mark.parametrize("dataset", ["shapes", "hela"])
def test_every_model_of_the_runner_builds(dataset, tmp_path):
    """Each variant of benchmarks/run_benchmark.py gives a config and a model (a renamed or removed key breaks it)."""
    from detectron2.modeling import build_model

    from benchmarks import control_heads  # noqa: F401  (the controls' ROI heads)
    from benchmarks.run_benchmark import MODELS, model_spec, parse_args
    from mnc_d2.config import build_cfg

    args = parse_args(["--dataset", dataset, "--iters", "10"])
    for name in MODELS:
        spec = model_spec(name, args, str(tmp_path / name))
        build_model(build_cfg(spec["config_file"], list(spec["opts"])))


def test_mask_rcnn_with_mnc_sampling_draws_mnc_rois():
    """HardBackgroundROIHeads: D2's StandardROIHeads sampling MNC's way (<= 30 % fg, 85 % of background hard)."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import torch

    from benchmarks import control_heads  # noqa: F401
    from conftest import make_batch, small_cfg

    cfg = small_cfg("MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.ROI_HEADS.NAME", "HardBackgroundROIHeads",
                    "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
                    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64, "MODEL.ROI_HEADS.POSITIVE_FRACTION", 0.3)
    torch.manual_seed(0)
    model = build_model(cfg)
    with EventStorage() as storage:
        losses = model(make_batch())
        assert all(torch.isfinite(v) for v in losses.values())
        fg = storage.history("roi_head/num_fg_samples").latest()
        bg = storage.history("roi_head/num_bg_samples").latest()
    assert 0 < fg <= 0.3 * 64 and fg + bg <= 64
    iou = model.roi_heads.proposal_matcher.max_iou  # (P,) of the last image's proposals, GT appended
    assert iou.numel() == 50 + 2 and iou.max() == 1.0
