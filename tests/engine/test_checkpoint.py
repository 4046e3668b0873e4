"""AtomicCheckpointer and the resumable Trainer: atomic writes, clear load errors, exact resumption."""
import json
import os

import pytest
import torch
from torch import nn

from conftest import small_cfg
from detectron2.engine import HookBase

from mnc_d2.checkpoint import AtomicCheckpointer, trim_metrics_json
from mnc_d2.utils.file_io import atomic_open
from mnc_d2.engine import Trainer
from mnc_d2.utils.errors import CheckpointError, CheckpointNotFoundError


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
    with pytest.raises(CheckpointError, match=r"model_0000003.pth \(No space left on device\).*model_0000001.pth"):
        checkpointer.save("model_0000003")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000003.pth").exists()
    assert AtomicCheckpointer(nn.Linear(3, 2), str(tmp_path)).resume_or_load("", resume=True) == {}


def test_remove_partial_files_of_killed_saves(tmp_path):
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000001")
    leftover = tmp_path / ".model_0000003.pth.0123456789ab.partial"  # what a kill -9 mid-save leaves
    leftover.write_bytes(b"\x00" * 10)
    checkpointer.resume_or_load("", resume=True)
    assert leftover.exists()  # loading alone (e.g. --eval-only beside a live run) leaves it
    assert checkpointer.remove_partial_files() == [str(leftover)]  # a training run, holding the run lock
    assert not leftover.exists() and (tmp_path / "model_0000001.pth").exists()


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
