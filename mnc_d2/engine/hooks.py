"""Trainer hooks for reproducible, resumable training."""
import logging

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.rng import derive_seed, seed_all_rngs

__all__ = ["PromoteCheckpoints", "ReproducibleRNG"]

logger = logging.getLogger(__name__)

_STEP_DOMAIN = 2  # keeps per-iteration seeds apart from per-sample seeds (mnc_d2.data.sampler)


class ReproducibleRNG(HookBase):
    """Seed the python/numpy/torch RNGs from (run seed, iteration, rank) before every iteration.

    The model draws random numbers in training (RPN and RoI sampling). With D2 0.6 their state after
    ``--resume`` is whatever ``default_setup`` seeded, not where the interrupted run was; seeding each
    iteration from its number makes iteration i draw the same numbers in both runs. The run seed
    (``SEED``, or one drawn at the first start when ``SEED < 0``) is saved in the checkpoint, so a
    resumed run with ``SEED: -1`` also continues the interrupted one.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self):
        seed_all_rngs(derive_seed(self.seed, _STEP_DOMAIN, self.trainer.iter, comm.get_rank()))

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])


class PromoteCheckpoints(HookBase):
    """Make a checkpoint last_checkpoint once the first loss computed with its weights is healthy
    (:meth:`mnc_d2.checkpoint.AtomicCheckpointer.judge_pending`). Registered before D2's PeriodicCheckpointer, so a
    checkpoint is judged before the next one is written."""

    def after_step(self):
        self.trainer.checkpointer.judge_pending()

    def after_train(self):  # model_final: judged on the last iteration's loss
        pending = self.trainer.checkpointer.pending
        if pending is not None and pending[0].startswith("model_final"):
            self.trainer.checkpointer.judge_pending(final=True)
