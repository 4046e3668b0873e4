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
import os
import secrets
import socket

import torch

from .warm_start import MNCWarmStartCheckpointer

from .errors import CheckpointError, CheckpointNotFoundError, NonFiniteError

__all__ = ["AtomicCheckpointer", "atomic_open", "atomic_write_json", "first_non_finite", "trim_metrics_json"]

logger = logging.getLogger(__name__)

# Temporary files are ".<target name>.<host>-<pid>-<random>.partial" next to the target.
PARTIAL_SUFFIX = ".partial"
_HOST = socket.gethostname().replace("-", "_").replace(".", "_")


def _writer_is_gone(partial_path: str) -> bool:
    """Whether the process that writes ``partial_path`` has ended: it ran on this host and its pid is
    not alive. Files of other hosts, of live processes, or of an unknown writer are kept."""
    try:
        parts = os.path.basename(partial_path)[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[1].split("-")
        host, pid = (parts[0], int(parts[1])) if len(parts) == 3 else (_HOST, int(parts[0]))  # 2: before hosts
    except (ValueError, IndexError):
        return False
    if host != _HOST:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _is_local(path: str) -> bool:
    return "://" not in path


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a crash after os.replace could otherwise lose it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary sibling of ``path`` for writing; on a clean exit flush, fsync and rename it over
    ``path``. On an exception the temporary file is removed and ``path`` is untouched. A kill leaves at
    most a hidden ``*.partial`` file, which :meth:`AtomicCheckpointer.remove_partial_files` cleans."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory,
                       f".{os.path.basename(path)}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def atomic_write_json(path, obj) -> None:
    """``json.dump(obj)`` into ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f)


def first_non_finite(state_dict):
    """Name of the first floating-point tensor in ``state_dict`` holding NaN or Inf, else None."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


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

    * ``save``: the checkpoint and then ``last_checkpoint`` are each written with :func:`atomic_open`;
      a model with a NaN/Inf tensor is refused (:class:`NonFiniteError`), so ``last_checkpoint``
      always names a finite, complete checkpoint.
    * ``load``: a missing file raises :class:`CheckpointNotFoundError`, an unreadable one
      :class:`CheckpointError`, both naming the path (D2 0.6: an ``AssertionError`` or a ``torch.load``
      traceback). An empty path still means "no weights" (training from scratch), as in D2.
    * ``resume_or_load``: removes ``*.partial`` files left by a killed save; a ``last_checkpoint``
      naming a missing file is an error, not a silent restart from scratch.

    Non-local ``save_dir`` (a URI) falls back to D2's non-atomic writes.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        bad = first_non_finite(data["model"])
        if bad is not None:
            raise NonFiniteError(
                f"Refusing to save checkpoint {name!r}: weight {bad!r} holds NaN/Inf. The last complete "
                f"checkpoint ({self.get_checkpoint_file() or 'none'}) is unchanged."
            )
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_open(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        if not _is_local(save_file):
            return super().tag_last_checkpoint(last_filename_basename)
        with atomic_open(save_file, "w") as f:
            f.write(last_filename_basename)

    def remove_partial_files(self) -> list:
        """Delete the temporary files of saves that were killed (their writer is gone; the partial file of
        a live run, e.g. one saving while ``--eval-only --resume`` reads its directory, stays). Returns
        their paths."""
        if not (self.save_dir and self.save_to_disk and _is_local(self.save_dir)):
            return []
        removed = []
        for path in glob.glob(os.path.join(glob.escape(self.save_dir), "." + "*" + PARTIAL_SUFFIX)):
            if not _writer_is_gone(path):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
        if removed:
            self.logger.warning(f"Removed {len(removed)} partial file(s) of interrupted saves: {removed}")
        return removed

    def resume_or_load(self, path: str, *, resume: bool = True):
        self.remove_partial_files()
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if _is_local(last) and not os.path.isfile(last):
                raise CheckpointNotFoundError(
                    f"Cannot resume: {os.path.join(self.save_dir, 'last_checkpoint')} names {last}, which "
                    "does not exist. Point last_checkpoint at an existing model_*.pth in that directory, "
                    "or delete it to start from MODEL.WEIGHTS."
                )
            return self.load(last)
        if resume:
            self.logger.info(f"No last_checkpoint in {self.save_dir}: starting from MODEL.WEIGHTS={path!r}")
        return self.load(path, checkpointables=[])

    def load(self, path, *args, **kwargs):
        if path and not os.path.isfile(path):
            if _is_local(path):
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
