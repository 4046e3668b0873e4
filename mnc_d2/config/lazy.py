"""Python (LazyConfig) configs, trained by ``train_net.py`` as yacs configs are::

    python train_net.py --config-file configs/lazy/mnc_R18_GN_FPN_shapes_cpu.py [train.max_iter=100 ...]

A config file holds, as D2's ``configs/common`` do: ``model`` (an ``L(MNC)(...)`` tree of the @configurable
constructors), ``dataloader.train`` / ``dataloader.test`` (mnc_d2's loaders: :mod:`mnc_d2.data.build`),
``optimizer``, ``lr_multiplier`` and ``train`` (D2's keys plus ``seed``); optionally ``extra_test_names``. It
runs through the same :class:`~mnc_d2.engine.Trainer` as a yacs config, so it gets the same guarantees (atomic
checkpoints, bit-exact ``--resume``, the OUTPUT_DIR lock, the stop on a non-finite loss, ``ERROR:`` lines): the
loop's settings are copied into the trainer's yacs config (:func:`trainer_cfg`), and the model, optimizer,
schedule and loaders are instantiated from the file (:class:`mnc_d2.engine.LazyTrainer`). An unknown ``train.*`` key
or ``key=value`` override is an error naming the file (or the override) and the key; an argument a constructor
does not take is ``instantiate``'s ``TypeError``, reported with the file and the part being built.
"""
import difflib
import os
from typing import List, Sequence

from omegaconf import DictConfig, OmegaConf

from detectron2.config import LazyConfig, get_cfg

from ..utils.errors import ConfigError
from .build import check_values
from .defaults import add_mnc_config

__all__ = ["MISSING", "is_lazy_config", "load_lazy_config", "trainer_cfg"]


REQUIRED = ("model", "dataloader", "optimizer", "lr_multiplier", "train")
TRAIN_KEYS = ("output_dir", "init_checkpoint", "max_iter", "amp", "checkpointer", "eval_period", "device", "seed",
              "log_period", "ddp")
MISSING = object()


def is_lazy_config(path: str) -> bool:
    return str(path).endswith(".py")


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply_overrides(cfg: DictConfig, overrides: List[str]) -> None:
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep:
            raise ConfigError(f"Command-line override {override!r}: Python configs take key=value overrides "
                              "(e.g. train.max_iter=100), not yacs KEY VALUE pairs")
        if OmegaConf.select(cfg, key.strip(), default=MISSING) is MISSING:
            parent, _, leaf = key.strip().rpartition(".")
            siblings = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            choices = list(siblings.keys()) if isinstance(siblings, DictConfig) else []
            raise ConfigError(f"Command-line override {override!r}: no key {key.strip()!r} in the config"
                              f"{_suggest(leaf, choices)}")
    try:
        LazyConfig.apply_overrides(cfg, overrides)
    except Exception as e:  # noqa: BLE001  (omegaconf / ast errors of a bad value)
        raise ConfigError(f"Command-line overrides {overrides}: {type(e).__name__}: {e}") from e


def load_lazy_config(path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``LazyConfig.load`` + ``key=value`` overrides, checked.

    Raises:
        ConfigError: naming the file (or the override) and the key.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        cfg = LazyConfig.load(path)
    except Exception as e:  # noqa: BLE001  (the file is Python: any error)
        raise ConfigError(f"Config file {path} cannot be loaded: {type(e).__name__}: {e}") from e
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"Config file {path}: missing top-level {', '.join(missing)} (a Python config defines "
                          f"{', '.join(REQUIRED)}: see configs/lazy/)")
    _apply_overrides(cfg, list(overrides))
    for key in cfg.train:
        if key not in TRAIN_KEYS:
            raise ConfigError(f"Config file {path}: unknown key train.{key}{_suggest(key, TRAIN_KEYS)}")
    cfg.config_file = path  # named by the trainer's errors
    return cfg


def trainer_cfg(lazy: DictConfig):
    """The trainer's yacs config: the loop's settings of ``lazy`` (train.*, the batch, the datasets), type-checked by
    yacs; a bad value is a ConfigError naming the file and the Python config's key."""
    train, loaders = lazy.train, lazy.dataloader
    names = loaders.train.names
    settings = {  # yacs key: (the Python config's key, value)
        "OUTPUT_DIR": ("train.output_dir", train.output_dir),
        "MODEL.WEIGHTS": ("train.init_checkpoint", train.init_checkpoint),
        "MODEL.DEVICE": ("train.device", train.device),
        "MODEL.ROI_HEADS.NUM_CLASSES": ("model.roi_heads.num_classes", lazy.model.roi_heads.num_classes),
        "SOLVER.MAX_ITER": ("train.max_iter", train.max_iter),
        "SOLVER.AMP.ENABLED": ("train.amp.enabled", train.amp.enabled),
        "SOLVER.CHECKPOINT_PERIOD": ("train.checkpointer.period", train.checkpointer.period),
        "SOLVER.IMS_PER_BATCH": ("dataloader.train.total_batch_size", loaders.train.total_batch_size),
        "TEST.EVAL_PERIOD": ("train.eval_period", train.eval_period),
        "SEED": ("train.seed", train.seed),
        "DATALOADER.NUM_WORKERS": ("dataloader.train.num_workers", loaders.train.get("num_workers", 0)),
        "DATASETS.TRAIN": ("dataloader.train.names", (names,) if isinstance(names, str) else tuple(names)),
        "DATASETS.TEST": ("dataloader.test.name", (loaders.test.name,) + tuple(lazy.get("extra_test_names", []) or [])),
        "MNC_RELIABILITY.BAD_TRAIN_IMAGE": ("dataloader.train.mapper.bad_image", loaders.train.mapper.get("bad_image", "skip")),
    }
    cfg = add_mnc_config(get_cfg())
    try:
        cfg.merge_from_list([item for key, (_, value) in settings.items() for item in (key, value)])
        check_values(cfg)
    except (ValueError, KeyError) as e:
        key = next((k for k in settings if k in str(e)), None)
        where = f"{settings[key][0]}={settings[key][1]!r}: " if key else ""
        raise ConfigError(f"Config file {lazy.get('config_file')}: {where}{e}") from None
    cfg.freeze()
    return cfg
