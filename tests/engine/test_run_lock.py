"""One training run per OUTPUT_DIR (issue "Reliability, round two", items 1 and 2), through train_net.py:
a second run on a live run's directory is refused with an ERROR naming the holder; a killed holder never
blocks the next run; ``--eval-only --resume`` beside a live run writes under its own folder and leaves
the live run's in-progress checkpoint alone."""
import os
import signal
import subprocess
import sys
import time

import pytest

import yaml

from conftest import PAUSED_SAVE_RUNNER, REPO, TINY_TRAIN_NET_OPTS

from mnc_d2.engine.run_lock import LOCK_NAME

pytestmark = pytest.mark.slow  # two train_net.py processes

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")
TINY = TINY_TRAIN_NET_OPTS + ["SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()"]


def _command(out_dir, *opts, runner=None, flags=()):
    prefix = [sys.executable] + ([str(runner)] if runner else [])
    return prefix + [os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *flags, *TINY, *opts,
                     "OUTPUT_DIR", str(out_dir)]


def _wait_for(condition, process, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _holder(out_dir):
    try:
        return (out_dir / LOCK_NAME).read_text()
    except OSError:
        return ""


def test_second_run_is_refused_and_a_killed_holder_does_not_block(tmp_path, env):
    out_dir = tmp_path / "run"
    first = subprocess.Popen(_command(out_dir, "SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "100000"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        _wait_for(lambda: f"pid {first.pid}" in _holder(out_dir) and list(out_dir.glob("events.out.tfevents.*")),
                  first, "the first run's lock and trainer")  # the trainer is built after config.yaml is written
        config_before = (out_dir / "config.yaml").read_text()
        assert config_before
        second = subprocess.run(_command(out_dir, "SOLVER.MAX_ITER", "2", "SOLVER.BASE_LR", "0.005"),
                                capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        error = [line for line in second.stderr.splitlines() if line.startswith("ERROR")]
        assert len(error) == 1 and str(out_dir) in error[0] and f"pid {first.pid}" in error[0], second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert (out_dir / "config.yaml").read_text() == config_before  # nothing of the first run overwritten
        assert yaml.safe_load(config_before)["SOLVER"]["BASE_LR"] != 0.005
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    started = time.time()
    third = subprocess.Popen(_command(out_dir, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100000",
                                      "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    _wait_for(lambda: f"pid {third.pid}" in _holder(out_dir), third, "the lock for the run after the kill", timeout=60)
    assert time.time() - started < 5 + 15  # python + torch + detectron2 import take most of this
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 0, out[-3000:]
    assert (out_dir / "model_final.pth").exists()


def test_eval_only_resume_beside_a_live_run_keeps_its_partial_checkpoint(tmp_path, env):
    out_dir = tmp_path / "run"
    runner = tmp_path / "paused_save_runner.py"
    runner.write_text(PAUSED_SAVE_RUNNER)
    saving, go_on = tmp_path / "saving", tmp_path / "go_on"
    trainer = subprocess.Popen(
        _command(out_dir, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", runner=runner),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env=dict(env, PAUSE_AT="3", SAVE_MARKER=str(saving), CONTINUE_MARKER=str(go_on)))
    try:
        _wait_for(saving.exists, trainer, "the paused save of iteration 3")
        partial = [p for p in os.listdir(out_dir) if p.endswith(".partial")]
        assert len(partial) == 1, os.listdir(out_dir)
        top_level = set(os.listdir(out_dir))
        evaluation = subprocess.run(_command(out_dir, flags=("--eval-only", "--resume")), capture_output=True,
                                    text=True, env=env, cwd=REPO, timeout=300)
        assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
        assert "segm" in evaluation.stdout + evaluation.stderr
        assert (out_dir / partial[0]).exists()  # the live run's checkpoint in progress survived
        assert set(os.listdir(out_dir)) == top_level | {"eval"}  # everything the evaluation wrote is under eval/
        (eval_dir,) = (out_dir / "eval").iterdir()
        assert {"config.yaml", "log.txt", "inference"} <= set(os.listdir(eval_dir))
    finally:
        go_on.touch()
    out, _ = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, out[-3000:]
    assert (out_dir / "model_0000003.pth").exists() and (out_dir / "model_final.pth").exists()
