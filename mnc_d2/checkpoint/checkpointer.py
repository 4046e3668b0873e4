"""Crash-safe checkpoints: a run killed at any moment (``kill -9``, OOM, power loss) resumes from the
last COMPLETE checkpoint.

D2 0.6 (fvcore) writes ``model_XXXXXXX.pth`` and then ``last_checkpoint`` in place: a kill during
either write leaves a truncated checkpoint, or a ``last_checkpoint`` naming one, and ``--resume``
then fails deep in ``torch.load``. Here every file is written to a hidden temporary sibling,
fsync'ed and renamed over the target (``os.replace`` is atomic on POSIX), so the target is always
the old or the new complete file. ``last_checkpoint`` is renamed only after its checkpoint.
"""
import contextlib
import glob
import json
import logging
import math
import os

import torch

from ..utils.errors import CheckpointError, CheckpointNotFoundError
from ..utils.file_io import PARTIAL_SUFFIX, AtomicWritesPathManager, atomic_open, is_local_path
from .warm_start import MNCWarmStartCheckpointer

__all__ = ["AtomicCheckpointer", "trim_metrics_json"]

logger = logging.getLogger(__name__)

def _describe_misfit(report: dict) -> str:
    """What of a checkpoint does not fit the model (from a warm-start report), NUM_CLASSES first."""
    parts = []
    for name, ckpt_shape, model_shape in report["shape_mismatch"]:
        if name.endswith("box_predictor.cls_score.weight"):
            parts.append(f"it was trained for {ckpt_shape[0] - 1} classes, this config has "
                         f"MODEL.ROI_HEADS.NUM_CLASSES {model_shape[0] - 1}")
    shapes = [f"{n} is {tuple(c)} there, {tuple(m)} here" for n, c, m in report["shape_mismatch"][:3]]
    missing = [n for n, _ in report["missing"][:3]]
    parts += shapes + ([f"it lacks {', '.join(missing)}" + (" ..." if len(report["missing"]) > 3 else "")]
                       if missing else [])
    return "; ".join(parts) + ". Use the config the checkpoint was trained with (its OUTPUT_DIR/config.yaml)."


def trim_metrics_json(path: str, before_iter: int) -> int:
    """Rewrite D2's ``metrics.json`` (one JSON object per line, appended by ``JSONWriter``) keeping the
    complete lines of iterations ``< before_iter``. A resumed run repeats the iterations after its
    checkpoint and a kill can tear the last line; without this both would stay in the file.

    Returns:
        int: the number of lines dropped.
    """
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = int(record["iteration"]) < before_iter
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with atomic_open(path, "w") as f:
            f.writelines(kept)
    return dropped


class AtomicCheckpointer(MNCWarmStartCheckpointer):  # warm starts log what loaded / stayed fresh
    """D2's DetectionCheckpointer with atomic writes and load errors that name the file.

    * ``save``: the checkpoint and then ``last_checkpoint`` are each written with :func:`atomic_open`, so
      ``last_checkpoint`` always names a complete checkpoint (the training loop stops before NaN/Inf
      weights are saved: :mod:`mnc_d2.engine.train_loop`).
    * ``load``: a missing file raises :class:`CheckpointNotFoundError`, an unreadable one
      :class:`CheckpointError`, both naming the path (D2 0.6: an ``AssertionError`` or a ``torch.load``
      traceback). An empty path still means "no weights" (training from scratch), as in D2.
    * ``resume_or_load``: a ``last_checkpoint`` naming a missing file is an error, not a silent restart
      from scratch. A training run removes the ``*.partial`` files of killed saves (:meth:`remove_partial_files`).

    Non-local ``save_dir`` (a URI) falls back to D2's non-atomic writes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path_manager = AtomicWritesPathManager(self.path_manager)

    def save(self, name: str, **kwargs) -> None:
        """fvcore's save (written atomically through ``self.path_manager``); a failed write (a full disk) names
        the file and the intact previous checkpoint."""
        try:
            super().save(name, **kwargs)
        except (OSError, RuntimeError) as e:
            cause = e
            while cause.__cause__ or cause.__context__:  # torch's zip writer keeps the file's OSError inside
                cause = cause.__cause__ or cause.__context__
            raise CheckpointError(
                f"Could not write {os.path.join(self.save_dir, name + '.pth')} ({cause}); nothing of it was kept, "
                f"and the previous checkpoint ({self.get_checkpoint_file() or 'none'}) is intact. Fix that (free "
                "space), then continue with --resume."
            ) from None

    # A checkpoint becomes last_checkpoint only once the first loss computed with its weights (that of the next
    # iteration; for model_final, the last iteration's) is finite and <= LOSS_BOUND x the (lower) median loss of
    # the iterations before that one among the first BASELINE_ITERS of this process (docs/troubleshooting.md).
    LOSS_BOUND = 10.0
    BASELINE_ITERS = 20
    pending = None  # (file name, iteration) of the checkpoint written but not yet judged

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """fvcore's, called by ``save``: inside a trainer the checkpoint waits for :meth:`judge_pending`."""
        trainer = self.checkpointables.get("trainer")
        if trainer is None or getattr(trainer, "storage", None) is None:  # saved outside a training loop
            return super().tag_last_checkpoint(last_filename_basename)
        self.pending = (last_filename_basename, trainer.iter)

    def judge_pending(self, final: bool = False) -> None:
        """Promote the pending checkpoint to last_checkpoint, or drop it with a warning, once a loss computed with
        its weights exists (``final``: the last iteration's loss judges model_final)."""
        if self.pending is None:
            return
        name, iteration = self.pending
        history = self.checkpointables["trainer"].storage.history("total_loss").values() \
            if "total_loss" in self.checkpointables["trainer"].storage.histories() else []
        judged = [(loss, it) for loss, it in history if it > iteration or (final and it == iteration)]
        if not judged:
            return
        self.pending = None
        loss, judged_at = judged[0]
        baseline = sorted(value for value, it in history[: self.BASELINE_ITERS] if it < judged_at) or [loss]
        bound = self.LOSS_BOUND * baseline[(len(baseline) - 1) // 2]  # the lower median
        if math.isfinite(loss) and loss <= bound:
            return super().tag_last_checkpoint(name)
        self.logger.warning(f"{os.path.join(self.save_dir, name)} was written but last_checkpoint still names "
                            f"{self.get_checkpoint_file() or 'none'}: the first loss computed with its weights, "
                            f"{loss:.4g}, is above {self.LOSS_BOUND:g}x the median of the earlier iterations' "
                            f"losses ({bound:.4g}; diverging?)")

    def remove_partial_files(self) -> list:
        """Delete the temporary files of saves that were killed. Only a training run calls this: it holds the
        directory's run lock, so no other process is writing there. Returns their paths."""
        if not (self.save_dir and self.save_to_disk and is_local_path(self.save_dir)):
            return []
        removed = glob.glob(os.path.join(glob.escape(self.save_dir), "." + "*" + PARTIAL_SUFFIX))
        for path in removed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        if removed:
            self.logger.warning(f"Removed {len(removed)} partial file(s) of interrupted saves: {removed}")
        return removed

    # Resuming and evaluating need every tensor of the model from the file (a warm start may leave some fresh).
    require_complete = False

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        report = self.last_report or {}
        if self.require_complete and report.get("fresh"):
            raise CheckpointError(f"{self._source} does not fit this model: {_describe_misfit(report)}")
        return incompatible

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if is_local_path(last) and not os.path.isfile(last):
                raise CheckpointNotFoundError(
                    f"Cannot resume: {os.path.join(self.save_dir, 'last_checkpoint')} names {last}, which "
                    "does not exist. Point last_checkpoint at an existing model_*.pth in that directory, "
                    "or delete it to start from MODEL.WEIGHTS."
                )
            previous, self.require_complete = self.require_complete, True
            try:
                return self.load(last)
            finally:
                self.require_complete = previous
        if resume:
            self.logger.info(f"No last_checkpoint in {self.save_dir}: starting from MODEL.WEIGHTS={path!r}")
        return self.load(path, checkpointables=[])

    def load(self, path, *args, **kwargs):
        if path and not os.path.isfile(path):
            if is_local_path(path):
                raise CheckpointNotFoundError(f"Checkpoint file {path} does not exist.")
            try:
                local = self.path_manager.get_local_path(path)
            except Exception as e:  # network / handler errors: name the URL, keep the cause
                raise CheckpointNotFoundError(f"Cannot fetch checkpoint {path}: {type(e).__name__}: {e}") from e
            if not os.path.isfile(local):
                raise CheckpointNotFoundError(f"Checkpoint {path} (fetched to {local}) does not exist.")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except CheckpointError:
            raise  # says what is wrong already (e.g. a file holding code)
        except Exception as e:
            raise CheckpointError(
                f"Cannot read checkpoint {filename}: {type(e).__name__}: {e}. The file may be truncated "
                "(an interrupted copy, a full disk) or not a checkpoint."
            ) from e
