"""The paper's benchmark through the user's entry point: train_net.py trains on an SBD fixture
(``sbd_2012_train``, written by the test in SBD's own .mat format under ``$DETECTRON2_DATASETS``) and
evaluates ``sbd_2012_val`` and ``voc_2012_seg_val`` with the mAP^r evaluator that their
``evaluator_type: mapr`` selects; then ``--eval-only`` re-evaluates the checkpoint. The numbers of a
two-iteration run mean nothing; the test checks the path, the printed metrics and the results files."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_TRAIN_NET_OPTS
from test_voc_sbd import write_sbd, write_voc

pytestmark = pytest.mark.slow  # train_net.py end to end

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")
OPTS = [*TINY_TRAIN_NET_OPTS, "DATASETS.TRAIN", "('sbd_2012_train',)",
        "DATASETS.TEST", "('sbd_2012_val','voc_2012_seg_val')", "MODEL.ROI_HEADS.NUM_CLASSES", "20",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "100"]


def run_train_net(*args, env):
    cmd = [sys.executable, "-W", "ignore", os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def check_mapr_results(inference_dir, dataset, num_gt):
    results = json.load(open(inference_dir / dataset / "mask_apr_results.json"))
    assert results["dataset"] == dataset and results["interpolation"] == "voc07"
    assert results["iou_thresholds"] == [0.5, 0.7]
    assert {"mAP@0.5", "mAP@0.7"} <= set(results["metrics"])
    assert len(results["classes"]) == 20
    assert {c["name"]: c["num_gt"] for c in results["classes"] if c["num_gt"]} == num_gt


def test_train_net_on_sbd_reports_mapr(tmp_path):
    write_sbd(tmp_path, {"train": ["a", "b", "c"], "val": ["d", "e"]})
    write_voc(tmp_path, {"val": ["f"]})
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path), MNC_D2_CACHE=str(tmp_path / "cache"))
    out_dir = tmp_path / "out"
    log = run_train_net("OUTPUT_DIR", str(out_dir), *OPTS, env=env)
    # D2's print_csv_format of the mAP^r evaluator's "segm_mAPr" task, once per test set
    assert log.count("copypaste: Task: segm_mAPr") == 2, log[-3000:]
    assert "Task: segm\n" not in log  # no COCO evaluation: the SBD/VOC sets have no COCO json
    check_mapr_results(out_dir / "inference", "sbd_2012_val", {"person": 2, "dog": 2})
    check_mapr_results(out_dir / "inference", "voc_2012_seg_val", {"person": 1, "dog": 1, "cat": 1})
    metrics = [json.loads(line) for line in open(out_dir / "metrics.json")]
    assert any("sbd_2012_val/segm_mAPr/mAP@0.5" in m for m in metrics), metrics[-1].keys()

    log = run_train_net("--eval-only", "MODEL.WEIGHTS", str(out_dir / "model_final.pth"),
                        "OUTPUT_DIR", str(tmp_path / "eval"), *OPTS, env=env)
    assert log.count("copypaste: Task: segm_mAPr") == 2
    (eval_dir,) = (tmp_path / "eval" / "eval").iterdir()  # an --eval-only run writes under OUTPUT_DIR/eval/<run>/
    check_mapr_results(eval_dir / "inference", "sbd_2012_val", {"person": 2, "dog": 2})
