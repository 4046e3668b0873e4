"""What the dataset modules share: the file cache, writing it safely, and idempotent registration."""
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["cache_root", "write_png_atomic", "build_dir_atomically", "register_dataset"]

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Root of mnc_d2's file cache: ``$MNC_D2_CACHE``, default ``~/.cache/mnc_d2``."""
    return Path(os.environ.get("MNC_D2_CACHE", "~/.cache/mnc_d2")).expanduser()


def write_png_atomic(path: Path, array: np.ndarray) -> None:
    """cv2.imwrite (BGR order for colour) to a temp file, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent, prefix=f".{path.stem}-")
    os.close(fd)
    try:
        if not cv2.imwrite(tmp, np.ascontiguousarray(array)):
            raise OSError(f"cv2 failed to write {path}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_dir_atomically(target: Path, write: Callable[[Path], None], done_file: str, replace: bool = False) -> None:
    """Create directory ``target`` so that it only ever appears complete.

    ``write(tmp)`` fills a fresh temporary sibling of ``target`` (``done_file`` last), which is then
    renamed to ``target``. A ``target`` without ``done_file`` (unfinished, or not ours), or any
    ``target`` if ``replace``, is moved aside first: ``os.rename`` cannot replace a directory. If
    another process publishes a complete ``target`` meanwhile, its copy is kept and ours discarded.
    The temporary directories are removed also on error or interruption.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    stale = tmp.with_name(tmp.name + "-old")
    try:
        write(tmp)
        if target.exists() and (replace or not (target / done_file).exists()):
            try:
                os.rename(target, stale)
            except FileNotFoundError:
                pass
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / done_file).exists():
                raise
            # Another process published the directory first: keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def register_dataset(name: str, loader: Callable[[], list], key: str, value, *, replace: bool = True, **metadata):
    """``DatasetCatalog.register(name, loader)`` and ``MetadataCatalog.get(name).set(key=value, **metadata)``,
    idempotent: registering ``name`` again with the same ``value`` does nothing; with another one it
    replaces the old registration (with a warning), or raises ``ValueError`` if not ``replace``."""
    if name in DatasetCatalog.list():
        old = MetadataCatalog.get(name).get(key, None)
        if old == value:
            return
        if not replace:
            raise ValueError(f"{name!r} is already registered with {key} {old}, not {value}")
        logger.warning(f"Replacing the registration of dataset {name!r} with {key} {value}")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata, **{key: value})
