"""AtomicCheckpointer and the resumable Trainer: atomic writes, clear load errors, exact resumption."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import small_cfg
from detectron2.engine import HookBase

from mnc_d2.checkpoint import AtomicCheckpointer, first_non_finite, trim_metrics_json
from mnc_d2.utils.file_io import atomic_open
from mnc_d2.engine import Trainer
from mnc_d2.utils.errors import CheckpointError, CheckpointNotFoundError, NonFiniteError


class _Counter:
    """A checkpointable with state."""

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _checkpointer(save_dir, **checkpointables):
    torch.manual_seed(0)
    return AtomicCheckpointer(nn.Linear(3, 2), str(save_dir), save_to_disk=True, **checkpointables)


def test_atomic_open_replaces_or_keeps(tmp_path):
    path = tmp_path / "file.txt"
    with atomic_open(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half of the new conte")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"], "the temporary file must be removed"
    with atomic_open(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new"


def test_save_and_resume_restores_checkpointables(tmp_path):
    counter = _Counter()
    checkpointer = _checkpointer(tmp_path, counter=counter)
    counter.value = 7
    checkpointer.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert [p for p in os.listdir(tmp_path) if p.endswith(".partial")] == []

    restored_counter = _Counter()
    restored = AtomicCheckpointer(nn.Linear(3, 2), str(tmp_path), save_to_disk=True, counter=restored_counter)
    extra = restored.resume_or_load("", resume=True)
    assert extra["iteration"] == 9 and restored_counter.value == 7
    assert torch.equal(restored.model.weight, checkpointer.model.weight)


def test_failed_save_keeps_last_checkpoint(tmp_path, monkeypatch):
    """A save that dies while writing leaves the previous checkpoint and last_checkpoint untouched."""
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000001")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"\x00" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpointer.save("model_0000003")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000003.pth").exists()
    assert AtomicCheckpointer(nn.Linear(3, 2), str(tmp_path)).resume_or_load("", resume=True) == {}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_removes_partial_files_of_killed_saves(tmp_path):
    from mnc_d2.utils.file_io import _HOST

    checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000001")
    pid = _dead_pid()
    leftover = tmp_path / f".model_0000003.pth.{_HOST}-{pid}-abcd.partial"  # what a kill -9 mid-save leaves
    legacy = tmp_path / f".model_0000005.pth.{pid}-abcd.partial"  # the name before it held the host
    live = tmp_path / f".model_0000007.pth.{_HOST}-{os.getpid()}-abcd.partial"  # a live run's save
    other_host = tmp_path / f".model_0000009.pth.elsewhere-{pid}-abcd.partial"  # can't tell: kept
    for path in (leftover, legacy, live, other_host):
        path.write_bytes(b"\x00" * 10)
    checkpointer.resume_or_load("", resume=True)
    assert not leftover.exists() and not legacy.exists() and (tmp_path / "model_0000001.pth").exists()
    assert live.exists() and other_host.exists()


def test_load_errors_name_the_file(tmp_path):
    checkpointer = _checkpointer(tmp_path)
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(CheckpointNotFoundError, match="nope.pth"):
        checkpointer.load(missing)
    truncated = tmp_path / "truncated.pth"
    checkpointer.save("full")
    truncated.write_bytes((tmp_path / "full.pth").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        checkpointer.load(str(truncated))
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    with pytest.raises(CheckpointNotFoundError, match="model_0000099.pth"):
        checkpointer.resume_or_load("", resume=True)
    assert checkpointer.load("") == {}  # an empty path still means "no weights", as in D2


def test_refuses_to_save_non_finite_weights(tmp_path):
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000001")
    with torch.no_grad():
        checkpointer.model.weight[0, 0] = float("nan")
    assert first_non_finite(checkpointer.model.state_dict()) == "weight"
    with pytest.raises(NonFiniteError, match="weight"):
        checkpointer.save("model_0000003")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_trim_metrics_json(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [json.dumps({"iteration": i, "loss": 1.0}) for i in range(6)]
    path.write_text("\n".join(lines) + '\n{"iteration": 6, "lo')  # a line torn by a kill
    assert trim_metrics_json(str(path), before_iter=4) == 3
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- Trainer


class _StopAfter(HookBase):
    """Ends training (like a crash) after iteration ``stop_iter``, once its checkpoint is written."""

    def __init__(self, stop_iter):
        self.stop_iter = stop_iter

    def after_step(self):
        if self.trainer.iter == self.stop_iter:
            raise KeyboardInterrupt


@pytest.fixture
def shapes_dataset(register_tiny_shapes):
    return register_tiny_shapes("test_checkpoint_shapes", num_images=6, seed=5)


def _train(cfg, stop_iter=None, resume=False):
    torch.manual_seed(123)  # the model's initial weights (train_net seeds them via default_setup)
    trainer = Trainer(cfg)
    if stop_iter is not None:
        trainer.register_hooks([_StopAfter(stop_iter)])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer


@pytest.mark.slow
def test_interrupted_and_resumed_training_is_bit_exact(tmp_path, shapes_dataset):
    """Resuming restores iteration, LR schedule position, optimizer momentum, data position and RNG:
    the final weights equal those of an uninterrupted run bit for bit (CPU, same thread count)."""
    def cfg(out):
        return small_cfg("DATASETS.TRAIN", (shapes_dataset,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2,
                         "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 2, "SOLVER.WARMUP_ITERS", 3,
                         "SOLVER.STEPS", (3,), "TEST.EVAL_PERIOD", 0, "INPUT.MIN_SIZE_TRAIN", (64,),
                         "INPUT.MAX_SIZE_TRAIN", 64, "DATALOADER.NUM_WORKERS", 0, "SEED", 3,
                         "OUTPUT_DIR", str(tmp_path / out))

    uninterrupted = _train(cfg("a"))
    interrupted = _train(cfg("b"), stop_iter=2)  # dies after iteration 2; the last checkpoint is from iteration 1
    assert interrupted.iter == 2
    resumed = _train(cfg("b"), resume=True)
    assert resumed.start_iter == 2, "resumes after the last complete checkpoint (iteration 1)"

    expected, got = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert uninterrupted.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    momentum = [uninterrupted.optimizer.state[p]["momentum_buffer"] for p in uninterrupted.model.parameters()]
    resumed_momentum = [resumed.optimizer.state[p]["momentum_buffer"] for p in resumed.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, resumed_momentum))

    saved = torch.load(str(tmp_path / "b" / "model_final.pth"), weights_only=True)
    assert set(saved) == {"model", "trainer", "iteration"} and saved["iteration"] == 4
    assert "optimizer" in saved["trainer"]["_trainer"] and saved["trainer"]["hooks"]["ReproducibleRNG"] == {"seed": 3}
