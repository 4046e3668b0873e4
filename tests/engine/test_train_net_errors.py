"""Errors through train_net.py: divergence and a full disk end with one ERROR line and exit status 2,
last_checkpoint names good weights and a full disk keeps the previous checkpoint; a checkpoint of another
NUM_CLASSES is an error for --eval-only and --resume; a bad DATASETS.TEST is reported before the first
iteration; a negative-width box is dropped with a warning."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_TRAIN_NET_OPTS

pytestmark = pytest.mark.slow  # train_net.py end to end

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")
TINY = TINY_TRAIN_NET_OPTS + ["SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1"]

# train_net.py whose save of one iteration's checkpoint hits a full disk (the file's write raises ENOSPC)
FULL_DISK_RUNNER = """
import errno, os, runpy, sys
import torch

_save = torch.save
class FullDisk:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self.f, name)
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("iteration") == int(os.environ["FULL_AT"]):
        f = FullDisk(f)
    return _save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _train(out_dir, env, *opts, runner=None, config=CONFIG):
    prefix = [sys.executable] + ([str(runner)] if runner else [])
    return subprocess.run(prefix + [os.path.join(REPO, "train_net.py"), "--config-file", config, *TINY, *opts,
                                    "OUTPUT_DIR", str(out_dir)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def _max_abs_weight(path):
    model = torch.load(path, weights_only=True)["model"]
    return max(float(v.abs().max()) for v in model.values() if v.is_floating_point() and v.numel())


def test_divergence_stops_cleanly_and_last_checkpoint_keeps_good_weights(tmp_path, env):
    out_dir = tmp_path / "run"
    out = _train(out_dir, env, "SOLVER.BASE_LR", "1e6", "SOLVER.MAX_ITER", "8")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
    assert len(error) == 1 and "Non-finite" in error[0], out.stderr[-3000:]
    assert "last_checkpoint, if the run wrote one, names the last good checkpoint" in error[0]
    assert "Traceback" not in out.stderr
    last = (out_dir / "last_checkpoint").read_text().strip() if (out_dir / "last_checkpoint").exists() else None
    if last is not None:  # whatever it names must hold sane weights (a normal run has max |w| ~ 1)
        assert _max_abs_weight(out_dir / last) < 100, last
    diverged = [p for p in out_dir.glob("model_*.pth") if p.name != last]
    assert any(_max_abs_weight(p) > 1e3 for p in diverged), "the test needs diverged checkpoints not promoted"


def _training_loss(run_dir, checkpoint):
    """Total training loss of ``checkpoint``'s weights on the run's first 4 training batches (train mode, no update)."""
    from mnc_d2.config import build_cfg
    from mnc_d2.engine import Trainer, load_weights

    cfg = build_cfg(str(run_dir / "config.yaml"))
    model = Trainer.build_model(cfg)
    load_weights(model, str(checkpoint))
    batches = iter(Trainer.build_train_loader(cfg))
    from detectron2.utils.events import EventStorage

    with torch.no_grad(), EventStorage():
        return sum(float(sum(model(next(batches)).values())) for _ in range(4)) / 4


@pytest.mark.parametrize("lr", ["5.0", "1.0"])
def test_last_checkpoint_holds_weights_whose_loss_is_healthy(tmp_path, env, lr):
    """A checkpoint is promoted when the first loss computed with its weights is within 10x the median of the first
    iterations' losses; at these learning rates training blows up, and a checkpoint written then is not promoted."""
    out_dir = tmp_path / "run"
    out = _train(out_dir, env, "SOLVER.BASE_LR", lr, "SOLVER.MAX_ITER", "20", "DATASETS.TEST", "()")
    assert out.returncode in (0, 2), out.stderr[-3000:]
    assert "was written but last_checkpoint still names" in out.stdout + out.stderr, "the test needs a diverged one"
    if (out_dir / "last_checkpoint").exists():
        promoted = out_dir / (out_dir / "last_checkpoint").read_text().strip()
        # a healthy run: about 4 after 2 iterations; the checkpoints promoted by the rule this replaced: 8.8e8 (5.0)
        # and 1.2e6 (1.0). Measured on other batches than the one that judged it, so the bound here is loose.
        assert _training_loss(out_dir, promoted) < 1000, promoted


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, env):
    out_dir = tmp_path / "run"
    runner = tmp_path / "full_disk_runner.py"
    runner.write_text(FULL_DISK_RUNNER)
    out = _train(out_dir, dict(env, FULL_AT="2"), "SOLVER.MAX_ITER", "6", runner=runner)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
    assert len(error) == 1, out.stderr[-3000:]
    assert "model_0000002.pth ([Errno 28] No space left on device)" in error[0]
    assert "model_0000001.pth" in error[0] and "intact" in error[0]
    assert "Traceback" not in out.stderr
    assert (out_dir / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(out_dir / "model_0000001.pth", weights_only=True)["iteration"] == 1
    assert not (out_dir / "model_0000002.pth").exists()
    assert not [p for p in os.listdir(out_dir) if p.endswith(".partial")]


# train_net.py after registering an empty dataset, as a user's wrapper script would
EMPTY_DATASET_RUNNER = """
import runpy, sys
from detectron2.data import DatasetCatalog, MetadataCatalog
DatasetCatalog.register("an_empty_val", lambda: [])
MetadataCatalog.get("an_empty_val").set(thing_classes=["a"], evaluator_type="coco")
import numpy as np, os, PIL.Image
folder = os.path.dirname(sys.argv[0])
open(os.path.join(folder, "zero_bytes.png"), "wb").close()
PIL.Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(os.path.join(folder, "wrong_size.png"))
for name in ("zero_bytes", "wrong_size"):
    DatasetCatalog.register(f"a_{name}_val", lambda n=name: [{"file_name": os.path.join(folder, n + ".png"),
                            "image_id": 0, "height": 64, "width": 64, "annotations": []}])
    MetadataCatalog.get(f"a_{name}_val").set(thing_classes=["a"], evaluator_type="coco")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("dataset, eval_period", [("not_registered_val", "0"), ("an_empty_val", "-1"),
                                                 ("a_zero_bytes_val", "0"), ("a_wrong_size_val", "0")])
def test_bad_test_dataset_is_reported_before_the_first_iteration(tmp_path, env, dataset, eval_period):
    out_dir = tmp_path / "run"
    runner = tmp_path / "runner.py"
    runner.write_text(EMPTY_DATASET_RUNNER)
    out = _train(out_dir, env, "SOLVER.MAX_ITER", "4", "DATASETS.TEST", f"('{dataset}',)", "TEST.EVAL_PERIOD",
                 eval_period, runner=runner)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
    assert len(error) == 1 and dataset in error[0], out.stderr[-3000:]
    assert not list(out_dir.glob("model_*.pth")) and not (out_dir / "metrics.json").exists()  # no iteration ran


def test_checkpoint_of_another_num_classes_is_an_error_for_eval_and_resume(tmp_path, env):
    out_dir = tmp_path / "run"
    out = _train(out_dir, env, "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()")
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoints = {p.name: p.read_bytes() for p in out_dir.glob("model_*.pth")}
    before = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file() and p.name != "log.txt"}
    for flags in (["--eval-only", "MODEL.WEIGHTS", str(out_dir / "model_final.pth")], ["--resume", "SOLVER.MAX_ITER", "4"]):
        command = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, flags[0], *TINY,
                   *flags[1:], "MODEL.ROI_HEADS.NUM_CLASSES", "7", "OUTPUT_DIR", str(out_dir)]
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert run.returncode == 2, flags + [run.stderr[-3000:]]
        error = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
        assert len(error) == 1 and "trained for 5 classes" in error[0] and "NUM_CLASSES 7" in error[0], run.stderr[-3000:]
        assert "Traceback" not in run.stderr
    assert {p.name: p.read_bytes() for p in out_dir.glob("model_*.pth")} == checkpoints  # none written or changed
    assert (out_dir / "last_checkpoint").read_text() == "model_final.pth"
    # a refused run writes nothing: config.yaml (the file the error points to) and the lock's text as they were,
    # no new events file (the eval folder holds only the refused evaluation's log)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file() and p.name != "log.txt"} == before
    assert all(set(os.listdir(d)) == {"log.txt"} for d in (out_dir / "eval").iterdir())


# train_net.py on a 2-image COCO json (written by the test) whose first box has a negative width
COCO_RUNNER = """
import runpy, sys
from detectron2.data.datasets import register_coco_instances
register_coco_instances("neg_box_train", {}, sys.argv[1], sys.argv[2])
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_negative_width_box_is_dropped_with_a_warning(tmp_path, env):
    import json

    from PIL import Image

    images, annotations = [], []
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(tmp_path / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": 64, "width": 64})
        polygon = [[8.0, 8.0, 40.0, 8.0, 40.0, 40.0, 8.0, 40.0]]
        annotations.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 1, "bbox": [8.0, 8.0, 32.0, 32.0],
                            "segmentation": polygon, "area": 1024.0, "iscrowd": 0})
    annotations[0]["bbox"] = [32.0, 32.0, -64.0, 64.0]
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": 1, "name": "thing"}]}))
    runner = tmp_path / "runner.py"
    runner.write_text(COCO_RUNNER)
    out = subprocess.run([sys.executable, str(runner), str(json_file), str(tmp_path),
                          os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *TINY,
                          "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TRAIN", "('neg_box_train',)",
                          "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "1", "TEST.EVAL_PERIOD", "0",
                          "OUTPUT_DIR", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "im0.png: dropped 1 malformed annotation(s)" in log and "negative width or height" in log, log[-3000:]


@pytest.mark.parametrize("case", ["num_stages", "pkl_contents", "base_cycle"])
def test_input_errors_are_one_error_line_not_a_traceback(tmp_path, env, case):
    """A bad NUM_STAGES, a .pkl of the wrong contents and a _BASE_ cycle end with exit 2 and an ERROR naming them."""
    import pickle

    config = CONFIG
    if case == "num_stages":
        opts, expected = ["MODEL.MNC.NUM_STAGES", "4"], "MODEL.MNC.NUM_STAGES must be 3 or 5, got 4"
    elif case == "base_cycle":  # D2 would recurse without end
        (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
        (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
        config, opts, expected = str(tmp_path / "a.yaml"), [], "its _BASE_ chain comes back to a file"
    else:
        weights = tmp_path / "weights.pkl"
        weights.write_bytes(pickle.dumps([1, 2, 3]))
        opts, expected = ["MODEL.WEIGHTS", str(weights)], f"{weights} is not a Detectron2 / Detectron weights file"
    out = _train(tmp_path / "run", env, "SOLVER.MAX_ITER", "2", *opts, config=config)
    assert out.returncode == 2, out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
    assert len(error) == 1 and expected in error[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr


def test_unusable_output_dir_and_bad_batch_are_one_error_line(tmp_path, env):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    for out_dir, opts, expected in [(blocked, (), "cannot hold the run"),
                                    (tmp_path / "run", ("SOLVER.IMS_PER_BATCH", "0"), "SOLVER.IMS_PER_BATCH must be >= 1")]:
        out = _train(out_dir, env, "SOLVER.MAX_ITER", "2", *opts)
        assert out.returncode == 2, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert blocked.read_text() == "not a folder" and not (tmp_path / "run").exists()


# train_net.py whose evaluation finds the disk full when it writes its results
EVAL_FULL_DISK_RUNNER = """
import errno, runpy, sys
from detectron2.evaluation import coco_evaluation
_open = coco_evaluation.PathManager.open
def full_disk_open(path, mode="r", **kwargs):
    if "w" in mode:
        raise OSError(errno.ENOSPC, "No space left on device", path)
    return _open(path, mode, **kwargs)
coco_evaluation.PathManager.open = full_disk_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_eval_only_on_a_full_disk_is_one_error_line(tmp_path, env):
    out_dir = tmp_path / "run"
    out = _train(out_dir, env, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()")
    assert out.returncode == 0, out.stderr[-3000:]
    runner = tmp_path / "eval_full_disk.py"
    runner.write_text(EVAL_FULL_DISK_RUNNER)
    command = [sys.executable, str(runner), os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, "--eval-only",
               *TINY, "MODEL.WEIGHTS", str(out_dir / "model_final.pth"), "OUTPUT_DIR", str(out_dir)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert (out_dir / "model_final.pth").exists() and (out_dir / "last_checkpoint").read_text() == "model_final.pth"
