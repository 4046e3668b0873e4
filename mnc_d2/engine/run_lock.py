"""One training run per output directory.

A training run holds an exclusive ``flock`` on ``OUTPUT_DIR/.mnc_d2_train.lock`` for its whole life
(rank 0 only); the file names the holder (host, pid, start time). A second run on the same directory
stops with a :class:`~mnc_d2.utils.errors.ConfigError` naming the directory and the holder, before it writes
anything. The kernel drops the lock when its holder dies, ``kill -9`` included, so a crashed run never
blocks the next one. ``flock`` works across processes, and across hosts on file systems that support it
(NFSv4, Lustre, CephFS; Linux maps it to POSIX locks on NFS).
"""
import datetime
import fcntl
import os
import socket

from ..utils.errors import ConfigError

__all__ = ["LOCK_NAME", "acquire_output_dir_lock", "holder_description"]

LOCK_NAME = ".mnc_d2_train.lock"
_held = {}  # directory -> open lock file, kept for the life of the process


def holder_description(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "unknown holder"
    except OSError:
        return "unknown holder"


def acquire_output_dir_lock(directory: str) -> str:
    """Take the training lock of ``directory`` (created if missing) for the rest of this process.

    Raises:
        ConfigError: another live process holds it; the message names the directory and the holder.
    """
    directory = os.path.abspath(directory)
    if directory in _held:
        return os.path.join(directory, LOCK_NAME)
    path = os.path.join(directory, LOCK_NAME)
    try:
        os.makedirs(directory, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:  # a regular file, a read-only or full disk
        raise ConfigError(f"OUTPUT_DIR {directory} cannot hold the run: {e.strerror or e} ({e.filename or path})") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(
            f"OUTPUT_DIR {directory} is in use by another training run ({holder_description(path)}). Two runs in "
            "one directory overwrite each other's checkpoints, config and metrics: wait for it to end, or give "
            "this run its own OUTPUT_DIR."
        ) from None
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n")
    f.flush()
    _held[directory] = f
    return path
