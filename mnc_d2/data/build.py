"""The data loaders of training and evaluation, as D2's ``build_detection_{train,test}_loader`` but over
checked dataset dicts (:mod:`.validation`), a :class:`~.mapper.RobustDatasetMapper` and, in training, the
resumable stream of :mod:`.sampler`. Called by the yacs Trainer and named by the Python (LazyConfig) configs.
"""
from typing import Optional, Sequence, Union

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.utils import comm

from ..utils.errors import ConfigError
from .mapper import RobustDatasetMapper
from .sampler import ResumableTrainingStream
from .validation import load_dataset_dicts

__all__ = ["build_mnc_train_loader", "build_mnc_test_loader"]


def _names(names: Union[str, Sequence[str]]):
    return [names] if isinstance(names, str) else list(names)


def build_mnc_train_loader(names: Union[str, Sequence[str]], mapper: RobustDatasetMapper, *, total_batch_size: int,
                           num_workers: int = 0, aspect_ratio_grouping: bool = True, filter_empty: bool = True,
                           num_classes: Optional[int] = None, bad_image: str = "skip", require_masks: bool = True,
                           seed: int = 0):
    """An infinite stream of batches (lists of mapped dicts) over the datasets ``names``; the trainer moves
    its position (seed, first sample) on ``--resume``. ``num_classes``: category ids are checked against it."""
    world_size = comm.get_world_size()
    if total_batch_size % world_size != 0:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH={total_batch_size} must be divisible by the number "
                          f"of processes ({world_size}).")
    dicts = load_dataset_dicts(_names(names), is_train=True, filter_empty=filter_empty, num_classes=num_classes,
                               bad_image=bad_image, require_masks=require_masks)
    stream = ResumableTrainingStream(dicts, mapper, seed=seed)
    return build_detection_train_loader(stream, mapper=None, total_batch_size=total_batch_size,
                                        aspect_ratio_grouping=aspect_ratio_grouping, num_workers=num_workers)


def build_mnc_test_loader(name: str, mapper: RobustDatasetMapper, *, num_workers: int = 0,
                          num_classes: Optional[int] = None):
    """Batches of one image of the dataset ``name`` (bad images raise: a result over fewer would be wrong)."""
    dicts = load_dataset_dicts([name], is_train=False, num_classes=num_classes)
    return build_detection_test_loader(dicts, mapper=mapper, num_workers=num_workers)
