"""What ``train_net.py``, the demo and the benchmarks share before training or evaluating: the config (yacs or
LazyConfig) with D2's ``default_setup``, the run directory's lock, the trainer class, and the weights to evaluate."""
import datetime
import logging
import os
import shutil
import socket

from detectron2.engine import DefaultPredictor, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicCheckpointer
from ..config import build_cfg
from ..config.lazy import load_lazy_config, trainer_cfg
from ..utils.errors import CheckpointError, CheckpointNotFoundError
from .lazy_trainer import LazyTrainer
from ..utils.file_io import atomic_open
from .run_lock import LOCK_NAME, acquire_output_dir_lock
from .trainer import Trainer

logger = logging.getLogger(__name__)

__all__ = ["MNCPredictor", "OutputDirSnapshot", "eval_output_dir", "load_weights", "load_weights_for_eval", "setup_cfg", "trainer_class"]


def load_weights(model, weights: str, *, strict: bool = True, allow_untrained: bool = False, resume_dir: str = None,
                 key: str = "MODEL.WEIGHTS"):
    """The one way every entry point loads weights (train_net's evaluation, the demo, export, analyze): a ``.pth``
    through ``torch.load(weights_only=True)``, a ``.pkl`` through the allow-list unpickler, so no code from the
    file runs. ``strict``: every tensor of the model must come from the file (evaluating or running fresh tensors is
    a mistake), else a :class:`CheckpointError` names what does not fit. ``resume_dir``: its last_checkpoint, when it
    has one, instead of ``weights``. An empty ``weights`` raises unless ``allow_untrained``."""
    checkpointer = AtomicCheckpointer(model, save_dir=resume_dir or "")
    checkpointer.require_complete = strict
    if resume_dir and checkpointer.has_checkpoint():
        return checkpointer.resume_or_load(weights, resume=True)
    if not weights:
        if allow_untrained:
            logger.warning(f"{key} is empty: running a randomly initialised model (untrained, as asked)")
            return {}
        raise CheckpointNotFoundError(
            f"{key} is empty" + (f" and {resume_dir} has no last_checkpoint" if resume_dir else "")
            + f": pass {key} path/to/model_final.pth" + (" (or --resume to use OUTPUT_DIR/last_checkpoint)"
                                                         if resume_dir is not None else "")
            + ("" if resume_dir is not None else "; --allow-untrained runs a random model on purpose") + "."
        )
    try:
        return checkpointer.load(weights, checkpointables=[])
    except CheckpointError as e:
        raise type(e)(f"{key}={weights!r}: {e}") from e


def load_weights_for_eval(cfg, model, resume: bool = False, checkpoint_dir: str = None):
    """``--eval-only``'s weights: the last checkpoint of ``checkpoint_dir`` (default OUTPUT_DIR) with ``resume``,
    else ``MODEL.WEIGHTS`` (:func:`load_weights`, strict; D2 0.6 evaluates a random model when it is empty)."""
    return load_weights(model, cfg.MODEL.WEIGHTS, resume_dir=(checkpoint_dir or cfg.OUTPUT_DIR) if resume else "")


class MNCPredictor(DefaultPredictor):
    """D2's DefaultPredictor (resizing, channel order, ``MODEL.DEVICE``) whose weights come through
    :func:`load_weights` (strict; no code from the file) instead of D2's checkpointer."""

    def __init__(self, cfg, allow_untrained: bool = False):
        without_weights = cfg.clone()
        without_weights.defrost()
        without_weights.MODEL.WEIGHTS = ""  # D2's checkpointer then loads nothing
        super().__init__(without_weights)
        self.cfg = cfg.clone()
        load_weights(self.model, cfg.MODEL.WEIGHTS, allow_untrained=allow_untrained)


def eval_output_dir(run_dir: str) -> str:
    """A fresh folder under ``run_dir`` for one ``--eval-only`` run: ``<run_dir>/eval/<time>-<pid>``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(run_dir, "eval", f"{stamp}-{os.getpid()}")


class OutputDirSnapshot:
    """What an output directory holds before a run writes to it; :meth:`restore` puts it back when the run is
    refused before training (a checkpoint that does not fit, bad weights): files and folders the run created are
    removed (its ``log.txt`` keeps the error), and ``config.yaml`` and the lock's holder line get their old text."""

    RESTORED = ("config.yaml", "config_lazy.yaml", LOCK_NAME)

    def __init__(self, directory: str):
        self.directory = directory
        self.names = set(os.listdir(directory)) if directory and os.path.isdir(directory) else set()
        self.texts = {}
        for name in set(self.RESTORED) & self.names:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                self.texts[name] = f.read()

    def restore(self) -> None:
        if not (self.directory and os.path.isdir(self.directory)):
            return
        for name in set(os.listdir(self.directory)) - self.names - {"log.txt"}:
            path = os.path.join(self.directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        for name, text in self.texts.items():
            with atomic_open(os.path.join(self.directory, name), "w") as f:
                f.write(text)


def setup_cfg(args):
    """:func:`build_cfg` from ``args.config_file`` and ``args.opts`` (a ``.py`` LazyConfig: its loop settings,
    :func:`mnc_d2.config.lazy.trainer_cfg`; the config itself in ``args.lazy_config``), then D2's default_setup.

    A training run first takes the lock of its OUTPUT_DIR (rank 0; :mod:`mnc_d2.engine.run_lock`). An
    ``--eval-only`` run takes none: it writes everything (config.yaml, log.txt, inference/) under its own
    :func:`eval_output_dir` and reads checkpoints from the run directory, kept in ``args.run_dir``.

    Raises:
        ConfigError: see :func:`build_cfg`; or OUTPUT_DIR is held by another training run.
    """
    if str(args.config_file).endswith(".py"):  # a LazyConfig: key=value overrides (mnc_d2.config.lazy)
        args.lazy_config = load_lazy_config(args.config_file, args.opts)
        cfg = trainer_cfg(args.lazy_config)
    else:
        args.lazy_config = None
        cfg = build_cfg(args.config_file, args.opts)
    args.run_dir = cfg.OUTPUT_DIR
    if getattr(args, "eval_only", False):
        cfg.defrost()
        cfg.OUTPUT_DIR = eval_output_dir(cfg.OUTPUT_DIR) if cfg.OUTPUT_DIR else cfg.OUTPUT_DIR
        cfg.freeze()
    args.output_snapshot = OutputDirSnapshot(cfg.OUTPUT_DIR) if comm.is_main_process() else None
    if cfg.OUTPUT_DIR and comm.is_main_process() and not getattr(args, "eval_only", False):
        acquire_output_dir_lock(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mnc_d2", abbrev_name="mnc")
    logger.info(f"Process {comm.get_rank()} of {comm.get_world_size()}: host {socket.gethostname()}, pid {os.getpid()}")
    if args.lazy_config is not None and cfg.OUTPUT_DIR and comm.is_main_process():
        from detectron2.config import LazyConfig

        LazyConfig.save(args.lazy_config, os.path.join(cfg.OUTPUT_DIR, "config_lazy.yaml"))
    return cfg


def trainer_class(args):
    """The trainer of ``args.config_file`` (after :func:`setup_cfg`): Trainer, or a LazyTrainer for a .py config."""
    if getattr(args, "lazy_config", None) is None:
        return Trainer
    return LazyTrainer.for_config(args.lazy_config)
