"""What ``train_net.py``, the demo and the benchmarks share before training or evaluating: the config (yacs or
LazyConfig) with D2's ``default_setup``, the run directory's lock, the trainer class, and the weights to evaluate."""
import datetime
import os

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicCheckpointer
from ..config import build_cfg
from ..config.lazy import load_lazy_config, trainer_cfg
from ..utils.errors import CheckpointError, CheckpointNotFoundError
from .lazy_trainer import LazyTrainer
from .run_lock import acquire_output_dir_lock
from .trainer import Trainer

__all__ = ["eval_output_dir", "load_weights_for_eval", "setup_cfg", "trainer_class"]


def load_weights_for_eval(cfg, model, resume: bool = False, checkpoint_dir: str = None):
    """Load the weights to evaluate: the last checkpoint of ``checkpoint_dir`` (default OUTPUT_DIR) with
    ``resume``, else ``MODEL.WEIGHTS``.

    D2 0.6 evaluates a randomly initialised model when ``MODEL.WEIGHTS`` is empty; here that, and a
    missing or unreadable file, raise a :class:`CheckpointError` naming the key and the path.
    """
    checkpoint_dir = checkpoint_dir or cfg.OUTPUT_DIR
    checkpointer = AtomicCheckpointer(model, save_dir=checkpoint_dir)
    checkpointer.require_complete = True  # evaluating tensors the file did not fill would be meaningless
    if resume and checkpointer.has_checkpoint():
        return checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
    if not cfg.MODEL.WEIGHTS:
        raise CheckpointNotFoundError(
            "--eval-only needs trained weights, but MODEL.WEIGHTS is empty"
            + (f" and {checkpoint_dir} has no last_checkpoint" if resume else "")
            + ": pass MODEL.WEIGHTS path/to/model_final.pth (or --resume to use OUTPUT_DIR/last_checkpoint)."
        )
    try:
        return checkpointer.load(cfg.MODEL.WEIGHTS, checkpointables=[])
    except CheckpointError as e:
        raise type(e)(f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r}: {e}") from e


def eval_output_dir(run_dir: str) -> str:
    """A fresh folder under ``run_dir`` for one ``--eval-only`` run: ``<run_dir>/eval/<time>-<pid>``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(run_dir, "eval", f"{stamp}-{os.getpid()}")


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
    elif cfg.OUTPUT_DIR and comm.is_main_process():
        acquire_output_dir_lock(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mnc_d2", abbrev_name="mnc")
    if args.lazy_config is not None and cfg.OUTPUT_DIR and comm.is_main_process():
        from detectron2.config import LazyConfig

        LazyConfig.save(args.lazy_config, os.path.join(cfg.OUTPUT_DIR, "config_lazy.yaml"))
    return cfg


def trainer_class(args):
    """The trainer of ``args.config_file`` (after :func:`setup_cfg`): Trainer, or a LazyTrainer for a .py config."""
    if getattr(args, "lazy_config", None) is None:
        return Trainer
    return LazyTrainer.for_config(args.lazy_config)
