from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def multi_step(max_iter: int, steps, warmup_iters: int = 1000, warmup_factor: float = 0.001):
    """LR x 1, then x 0.1 at each of ``steps``, after a linear warm-up (D2's WarmupMultiStepLR)."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[0.1 ** k for k in range(len(steps) + 1)],
                                             milestones=list(steps), num_updates=max_iter),
        warmup_length=warmup_iters / max_iter,
        warmup_factor=warmup_factor,
    )
