"""End to end through the user's entry point: train_net.py trains the instant-test config on the tiny
synthetic split, then --eval-only on the written checkpoint reports segm and bbox AP."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # train_net.py end to end

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")


def run_train_net(*args, env):
    cmd = [sys.executable, "-W", "ignore", os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_train_then_eval_only(tmp_path):
    env = dict(os.environ, MNC_D2_CACHE=str(tmp_path / "cache"))
    out_dir = tmp_path / "out"
    log = run_train_net("OUTPUT_DIR", str(out_dir), env=env)
    assert "copypaste: Task: segm" in log and "copypaste: Task: bbox" in log
    assert (out_dir / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in open(out_dir / "metrics.json")]
    assert any("segm/AP" in m and "bbox/AP" in m for m in metrics)
    assert max(m["iteration"] for m in metrics) >= 19
    assert any("loss_mask" in m for m in metrics)
    assert glob.glob(str(out_dir / "events.out.tfevents.*")), "no TensorBoard events written"

    log = run_train_net("--eval-only", "MODEL.WEIGHTS", str(out_dir / "model_final.pth"),
                        "OUTPUT_DIR", str(tmp_path / "eval"), env=env)
    assert "Evaluation results for segm" in log and "Evaluation results for bbox" in log
    (eval_dir,) = (tmp_path / "eval" / "eval").iterdir()  # an --eval-only run writes under OUTPUT_DIR/eval/<run>/
    results = json.load(open(eval_dir / "inference" / "mnc_shapes_tiny_val" / "coco_instances_results.json"))
    assert results and {"segmentation", "bbox", "score", "category_id"} <= set(results[0])
