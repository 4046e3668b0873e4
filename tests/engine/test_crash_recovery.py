"""Crashes mid-training and NaN/Inf.

* ``kill -9`` of ``train_net.py`` at a random moment, and once in the middle of a checkpoint save;
  ``--resume`` continues from the last complete checkpoint and the run ends with weights and
  evaluation metrics IDENTICAL (bit for bit) to those of an uninterrupted run: same iteration
  counter, LR schedule position, optimizer state, data order and random numbers.
* A NaN/Inf loss, gradient or weight stops training with an error naming the iteration and the
  loss terms / parameters; no update with it is applied and the last checkpoint stays loadable.
* Evaluation results are written atomically.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import LAZY_INSTANT_CONFIG, PAUSED_SAVE_RUNNER, REPO, TINY_LAZY_OPTS, TINY_TRAIN_NET_OPTS, small_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.structures import Boxes, Instances

from mnc_d2.engine import AtomicCOCOEvaluator, Trainer
from mnc_d2.utils.errors import NonFiniteError

pytestmark = pytest.mark.slow  # training runs, killed and resumed

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")
# The instant test made smaller: 64 px images, a thinner model, 6 iterations, a checkpoint every 2.
TINY = TINY_TRAIN_NET_OPTS + ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "2",
                              "SOLVER.STEPS", "(4,)"]


# the same run from a Python (LazyConfig) config: key=value overrides
TINY_LAZY = TINY_LAZY_OPTS + ["train.max_iter=6", "train.checkpointer.period=2", "lr_multiplier.warmup_length=0.3333",
                              "lr_multiplier.scheduler.values=[1.0,0.1]",
                              "lr_multiplier.scheduler.milestones=[4]", "lr_multiplier.scheduler.num_updates=6"]


def _command(out_dir, *flags, runner=None, kind="yaml"):
    prefix = [sys.executable] + ([str(runner)] if runner else [])
    if kind == "py":
        return prefix + [os.path.join(REPO, "train_net.py"), "--config-file", LAZY_INSTANT_CONFIG, *flags, *TINY_LAZY,
                         f"train.output_dir={out_dir}"]
    return prefix + [os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *flags, *TINY, "OUTPUT_DIR", str(out_dir)]


def _run(out_dir, env, *flags, kind="yaml"):
    out = subprocess.run(_command(out_dir, *flags, kind=kind), capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _final_eval(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.json")) if "segm/AP" in line][-1]


def _assert_same_final_state(out_dir, baseline_dir):
    got = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=True)
    expected = torch.load(os.path.join(baseline_dir, "model_final.pth"), weights_only=True)
    assert got["iteration"] == expected["iteration"] == 5
    assert [k for k in expected["model"] if not torch.equal(expected["model"][k], got["model"][k])] == []
    momentum = [s["momentum_buffer"] for s in expected["trainer"]["_trainer"]["optimizer"]["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in got["trainer"]["_trainer"]["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, resumed_momentum))
    assert got["trainer"]["hooks"]["LRScheduler"] == expected["trainer"]["hooks"]["LRScheduler"]
    got_eval, expected_eval = _final_eval(out_dir), _final_eval(baseline_dir)
    assert {k: v for k, v in got_eval.items() if "AP" in k} == {k: v for k, v in expected_eval.items() if "AP" in k}
    iterations = [json.loads(line)["iteration"] for line in open(os.path.join(out_dir, "metrics.json"))]
    assert iterations == sorted(iterations), "metrics.json: no repeated iterations after the resume"


@pytest.fixture(scope="module", params=["yaml", "py"])
def baseline(request, tmp_path_factory, env):
    """An uninterrupted run of a yacs (.yaml) or a Python (LazyConfig, .py) config: (its folder, the kind)."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    _run(out_dir, env, kind=request.param)
    return out_dir, request.param


def _wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, f"training ended before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_kill_at_random_moment_then_resume(tmp_path, env, baseline):
    baseline, kind = baseline
    out_dir = tmp_path / "run"
    delay = random.uniform(0.0, 1.0)  # the run has 4 more iterations, 2 saves and the evaluation to go
    process = subprocess.Popen(_command(out_dir, kind=kind), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env, cwd=REPO)
    try:
        _wait_for(out_dir / "model_0000001.pth", process)
        time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself within {delay:.2f} s; not killed"
    last = (out_dir / "last_checkpoint").read_text()
    assert torch.load(str(out_dir / last), weights_only=True)["model"], f"{last} must load (killed {delay:.2f} s in)"
    log = _run(out_dir, env, "--resume", kind=kind)
    assert "Resuming at iteration" in log, log[-2000:]
    _assert_same_final_state(out_dir, baseline)


def test_kill_during_checkpoint_save_then_resume(tmp_path, env, baseline):
    baseline, kind = baseline
    out_dir = tmp_path / "run"
    runner = tmp_path / "slow_save_runner.py"
    runner.write_text(PAUSED_SAVE_RUNNER)
    marker = tmp_path / "saving"
    process = subprocess.Popen(_command(out_dir, runner=runner, kind=kind), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env=dict(env, PAUSE_AT="3", SAVE_MARKER=str(marker),
                                        CONTINUE_MARKER=str(tmp_path / "never")), cwd=REPO)
    try:
        _wait_for(marker, process)  # the save of iteration 3 has written its first bytes
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    partial = [p for p in os.listdir(out_dir) if p.endswith(".partial")]
    assert len(partial) == 1 and partial[0].startswith(".model_0000003.pth."), os.listdir(out_dir)
    assert not (out_dir / "model_0000003.pth").exists()
    assert (out_dir / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(str(out_dir / "model_0000001.pth"), weights_only=True)["iteration"] == 1

    log = _run(out_dir, env, "--resume", kind=kind)
    assert "Resuming at iteration 2" in log and "partial file" in log, log[-3000:]
    assert not [p for p in os.listdir(out_dir) if p.endswith(".partial")]
    _assert_same_final_state(out_dir, baseline)


# --------------------------------------------------------------------------- NaN / Inf


@pytest.fixture
def shapes_dataset(register_tiny_shapes):
    return register_tiny_shapes("test_faults_shapes", num_images=4, seed=7)


class _Snapshot(HookBase):
    """Keeps a copy of the weights after every iteration."""

    def after_step(self):
        self.iter = self.trainer.iter
        self.weights = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}


def _trainer(tmp_path, dataset):
    cfg = small_cfg("DATASETS.TRAIN", (dataset,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 6,
                    "SOLVER.CHECKPOINT_PERIOD", 2, "TEST.EVAL_PERIOD", 0, "INPUT.MIN_SIZE_TRAIN", (64,),
                    "INPUT.MAX_SIZE_TRAIN", 64, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path / "out"))
    trainer = Trainer(cfg)
    snapshot = _Snapshot()
    trainer.register_hooks([snapshot])
    trainer.resume_or_load(resume=False)
    return trainer, snapshot


def _assert_stopped_cleanly(trainer, snapshot, tmp_path, weights_changed_at_3=False):
    assert snapshot.iter == 2, "the hooks of iteration 3 did not run"
    if not weights_changed_at_3:
        now = trainer.model.state_dict()
        assert all(torch.equal(now[k], snapshot.weights[k]) for k in now), "no update was applied at iteration 3"
    out = tmp_path / "out"
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_0000003.pth").exists() and not (out / "model_final.pth").exists()
    saved = torch.load(str(out / "model_0000001.pth"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_nan_loss_stops_before_the_update(tmp_path, shapes_dataset):
    trainer, snapshot = _trainer(tmp_path, shapes_dataset)

    def nan_mask_loss(module, inputs, losses):
        if trainer.iter == 3:
            return dict(losses, loss_mask=losses["loss_mask"] * float("nan"), loss_cls=losses["loss_cls"] + float("inf"))

    trainer.model.register_forward_hook(nan_mask_loss)
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    message = str(info.value)
    assert "iteration 3" in message and "loss_mask=nan" in message and "loss_cls=inf" in message
    assert "loss_box_reg" not in message
    _assert_stopped_cleanly(trainer, snapshot, tmp_path)


def test_nan_gradient_stops_before_the_update(tmp_path, shapes_dataset):
    trainer, snapshot = _trainer(tmp_path, shapes_dataset)
    weight = trainer.model.roi_heads.box_predictor.cls_score.weight

    def nan_gradient(module, inputs, losses):
        if trainer.iter == 3:  # finite value (0), gradient 0 * d sqrt(x)/dx at 0 = 0 * inf = NaN
            return dict(losses, loss_extra=torch.sqrt(weight.sum() * 0))

    trainer.model.register_forward_hook(nan_gradient)
    with pytest.raises(NonFiniteError, match=r"Non-finite gradient at iteration 3 .*roi_heads.box_predictor.cls_score.weight"):
        trainer.train()
    _assert_stopped_cleanly(trainer, snapshot, tmp_path)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_non_finite_weights_after_a_step_are_never_saved(tmp_path, shapes_dataset):
    trainer, snapshot = _trainer(tmp_path, shapes_dataset)
    step = trainer.optimizer.step
    weight = trainer.model.roi_heads.box_predictor.bbox_pred.weight

    def overflowing_step(*args, **kwargs):
        step(*args, **kwargs)
        if trainer.iter == 3:
            with torch.no_grad():
                weight[0, 0] = float("inf")

    trainer.optimizer.step = overflowing_step
    with pytest.raises(NonFiniteError, match=r"step of iteration 3 made 1 weight\(s\) non-finite: roi_heads.box_predictor.bbox_pred"):
        trainer.train()
    _assert_stopped_cleanly(trainer, snapshot, tmp_path, weights_changed_at_3=True)


# --------------------------------------------------------------------------- evaluation files


def test_evaluation_results_are_written_atomically(tmp_path, shapes_dataset, monkeypatch):
    DatasetCatalog.get(shapes_dataset)  # writes the json the evaluator reads
    out_dir = tmp_path / "inference"
    evaluator = AtomicCOCOEvaluator(shapes_dataset, tasks=("bbox",), distributed=True, output_dir=str(out_dir),
                                    use_fast_impl=False)

    def evaluate():
        evaluator.reset()
        for image_id in range(1, 5):
            instances = Instances((64, 64), pred_boxes=Boxes(torch.tensor([[4.0, 4.0, 30.0, 30.0]])),
                                  scores=torch.tensor([0.9]), pred_classes=torch.tensor([1]))
            evaluator.process([{"image_id": image_id}], [{"instances": instances}])
        return evaluator.evaluate()

    assert "bbox" in evaluate()
    results_file = out_dir / "coco_instances_results.json"
    results = json.loads(results_file.read_text())
    assert len(results) == 4 and results[0]["category_id"] == 2  # contiguous id 1 -> the json's id 2
    assert (out_dir / "instances_predictions.pth").is_file()

    from detectron2.evaluation import coco_evaluation

    class TornFile:  # D2 writes the results with one f.write: a kill in it leaves the first bytes
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:20])
            raise OSError("killed while writing")

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.f.close()

    real_open = coco_evaluation.PathManager.open
    monkeypatch.setattr(coco_evaluation.PathManager, "open", lambda path, mode="r", **kwargs: TornFile(
        real_open(path, mode, **kwargs)) if path.endswith(".json") and "w" in mode else real_open(path, mode, **kwargs))
    with pytest.raises(OSError):
        evaluate()
    assert json.loads(results_file.read_text()) == results, "the previous results file is intact"
    assert sorted(os.listdir(out_dir)) == ["coco_instances_results.json", "instances_predictions.pth"]
