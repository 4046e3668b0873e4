"""The trainer of a Python (LazyConfig) config: :class:`~mnc_d2.engine.Trainer` with the model, optimizer, schedule
and loaders instantiated from the file (:mod:`mnc_d2.config.lazy` loads and checks it)."""
import logging

import torch
from omegaconf import DictConfig, OmegaConf

from detectron2.config import instantiate
from detectron2.solver import LRMultiplier
from detectron2.utils.logger import _log_api_usage

from ..config.lazy import MISSING
from ..utils.errors import ConfigError
from .trainer import Trainer, training_seed

__all__ = ["LazyTrainer"]

logger = logging.getLogger(__name__)


class LazyTrainer(Trainer):
    """:class:`~mnc_d2.engine.Trainer` whose model, optimizer, schedule and loaders come from a LazyConfig
    (``for_config``); everything else (checkpoints, resume, hooks, evaluation) is the yacs path's."""

    lazy: DictConfig = None

    @classmethod
    def for_config(cls, lazy: DictConfig):
        return type(cls.__name__, (cls,), {"lazy": lazy})

    @classmethod
    def _instantiate(cls, key: str, **updates):
        """``instantiate(lazy.<key>)`` in place (interpolations such as ``${model.roi_heads.num_classes}``
        resolve against the whole config), with ``updates`` set on the node for this call only."""
        node = OmegaConf.select(cls.lazy, key)
        saved = {k: node.get(k, MISSING) for k in updates}
        for k, v in updates.items():
            node[k] = v
        try:
            return instantiate(node)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"Config file {cls.lazy.get('config_file')}: {key}: cannot build it: "
                              f"{type(e).__name__}: {e}") from e
        finally:
            for k, v in saved.items():
                if v is MISSING:
                    del node[k]
                else:
                    node[k] = v

    @classmethod
    def build_model(cls, cfg):
        model = cls._instantiate("model")
        model.to(torch.device(cfg.MODEL.DEVICE))
        _log_api_usage("modeling.meta_arch." + type(model).__name__)
        logger.info(f"Model:\n{model}")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        cls.lazy.optimizer.params.model = model
        try:
            return cls._instantiate("optimizer")
        finally:
            cls.lazy.optimizer.params.model = None

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return LRMultiplier(optimizer, multiplier=cls._instantiate("lr_multiplier"), max_iter=cfg.SOLVER.MAX_ITER)

    @classmethod
    def build_train_loader(cls, cfg):
        return cls._instantiate("dataloader.train", seed=training_seed(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return cls._instantiate("dataloader.test", name=dataset_name)
