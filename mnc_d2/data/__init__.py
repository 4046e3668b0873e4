"""Data: the datasets (:mod:`.datasets`; importing this package registers them), the mapper
(:mod:`.mapper`), the training sampler (:mod:`.sampler`) and the checks run when a dataset is loaded
(:mod:`.validation`)."""

from . import datasets
from .datasets import *  # noqa: F401,F403  (re-exported: mnc_d2.data.register_mnc_shapes etc.)

__all__ = datasets.__all__
