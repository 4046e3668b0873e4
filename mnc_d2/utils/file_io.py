"""Atomic file writing: a file is written to a hidden temporary sibling, fsync'ed and renamed over its target
(``os.replace`` is atomic on POSIX), so a reader sees the old or the new complete file, never a torn one. Used
for checkpoints, results and metrics."""
import contextlib
import json
import os
import secrets

__all__ = ["AtomicWritesPathManager", "PARTIAL_SUFFIX", "atomic_open", "atomic_write_json", "check_output_dir", "is_local_path"]

# Temporary files are ".<target name>.<random>.partial" next to the target.
PARTIAL_SUFFIX = ".partial"


def is_local_path(path: str) -> bool:
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
    most a hidden ``*.partial`` file, which the next training run in that directory removes
    (:meth:`AtomicCheckpointer.remove_partial_files`)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory,
                       f".{os.path.basename(path)}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
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


class AtomicWritesPathManager:
    """A path manager whose ``open`` for writing a local file is :func:`atomic_open` (fvcore's checkpointer
    writes through ``self.path_manager.open``); everything else is the wrapped manager's."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path, mode: str = "r", **kwargs):
        if "w" in mode and is_local_path(path):
            return atomic_open(path, mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._path_manager, name)


def atomic_write_json(path, obj, **json_kwargs) -> None:
    """``json.dump(obj, **json_kwargs)`` into ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **json_kwargs)


def check_output_dir(directory: str) -> None:
    """Create ``directory`` and check that files can be written there, before any work (a tool's ``--output``)."""
    from .errors import ConfigError

    try:
        os.makedirs(directory, exist_ok=True)
        with atomic_open(os.path.join(directory, ".mnc_d2_write_test"), "w") as f:
            f.write("ok")
        os.remove(os.path.join(directory, ".mnc_d2_write_test"))
    except OSError as e:
        raise ConfigError(f"--output {directory}: cannot write there ({e.strerror or e}).") from None
