"""D2's SimpleTrainer / AMPTrainer that stop on a NaN/Inf before it reaches the weights.

D2 0.6's ``SimpleTrainer.run_step`` is forward -> backward -> ``_write_metrics`` -> ``optimizer.step``;
``_write_metrics`` raises ``FloatingPointError`` only when the SUM of the losses averaged over
processes is non-finite, and only on the main process: the other processes go on to the next
collective and hang; a finite loss with a NaN/Inf gradient, or a step that overflows the weights,
is not caught at all, and the next periodic checkpoint then saves NaN weights.

Here, before the step and on every process alike: each loss term on every process must be finite,
and (SimpleTrainer) so must every gradient (gradients are identical across processes after DDP's
all-reduce); after the step, every weight. Otherwise :class:`NonFiniteError` names the iteration and
the loss terms / parameters; the exception stops training before any hook runs for that
iteration, so no checkpoint holds the bad values.
"""
import torch
import torch.distributed as dist

from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm

from ..utils.errors import NonFiniteError

__all__ = ["GuardedSimpleTrainer", "GuardedAMPTrainer", "non_finite_parameters"]

_MAX_NAMED = 5  # parameter names listed in one message
_ADVICE = (
    "No update was applied at this iteration and no checkpoint holds these values; OUTPUT_DIR/last_checkpoint, if "
    "the run wrote one, names the last good checkpoint. Lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or set "
    "SOLVER.CLIP_GRADIENTS.ENABLED True, then resume with --resume."
)


def non_finite_parameters(model, gradients: bool = False):
    """Names of parameters whose value (or, with ``gradients``, gradient) holds NaN or Inf."""
    model = getattr(model, "module", model)  # DDP: report the model's own names
    named = [(n, p.grad if gradients else p) for n, p in model.named_parameters()]
    named = [(n, t.detach()) for n, t in named if t is not None]
    if not named:
        return []
    # Fast path: one fused norm per tensor, one host sync. A NaN/Inf makes the norm non-finite; the
    # tensors it flags are then checked exactly (a finite tensor's norm can overflow, above ~1e19).
    norms = torch.stack(torch._foreach_norm([t for _, t in named]))
    if bool(torch.isfinite(norms).all()):
        return []
    flagged = [i for i, ok in enumerate(torch.isfinite(norms).tolist()) if not ok]
    return [named[i][0] for i in flagged if not bool(torch.isfinite(named[i][1]).all())]


def _any_process(flag: bool, device) -> bool:
    """True if ``flag`` is True on any process (every process must call this)."""
    if comm.get_world_size() == 1:
        return flag
    if dist.get_backend() == dist.Backend.NCCL:
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


class _NonFiniteGuard:
    """Mixin for SimpleTrainer / AMPTrainer; see the module docstring."""

    check_gradients = True

    def _write_metrics(self, loss_dict, data_time, prefix=""):
        bad_terms = {k: float(v.detach()) for k, v in loss_dict.items() if not bool(torch.isfinite(v).all())}
        device = next(iter(loss_dict.values())).device if loss_dict else torch.device("cpu")
        if _any_process(bool(bad_terms), device):
            per_process = comm.all_gather(bad_terms)
            described = "; ".join(
                f"process {rank}: " + ", ".join(f"{k}={v}" for k, v in terms.items())
                for rank, terms in enumerate(per_process) if terms
            )
            raise NonFiniteError(f"Non-finite loss at iteration {self.iter}: {described}. {_ADVICE}")
        if self.check_gradients:
            bad_grads = non_finite_parameters(self.model, gradients=True)
            if bad_grads:
                names = ", ".join(bad_grads[:_MAX_NAMED]) + (" ..." if len(bad_grads) > _MAX_NAMED else "")
                terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in loss_dict.items())
                raise NonFiniteError(
                    f"Non-finite gradient at iteration {self.iter} (losses {terms} are finite) in "
                    f"{len(bad_grads)} parameter(s): {names}. {_ADVICE}"
                )
        super()._write_metrics(loss_dict, data_time, prefix)

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:  # D2's own checks (e.g. the RPN's "Predicted boxes or scores contain Inf/NaN")
            if isinstance(e, NonFiniteError):
                raise
            raise NonFiniteError(f"Non-finite values at iteration {self.iter}: {e} {_ADVICE}") from e
        bad = non_finite_parameters(self.model)
        if bad:  # identical on every process: DDP keeps the replicas equal
            names = ", ".join(bad[:_MAX_NAMED]) + (" ..." if len(bad) > _MAX_NAMED else "")
            raise NonFiniteError(
                f"The optimizer step of iteration {self.iter} made {len(bad)} weight(s) non-finite: {names}. "
                "Training stops before any checkpoint is saved with them; OUTPUT_DIR/last_checkpoint, if the run "
                "wrote one, names the last good checkpoint. Lower SOLVER.BASE_LR or set SOLVER.CLIP_GRADIENTS.ENABLED True."
            )


class GuardedSimpleTrainer(_NonFiniteGuard, SimpleTrainer):
    """SimpleTrainer that checks losses, gradients and weights for NaN/Inf (module docstring)."""


class GuardedAMPTrainer(_NonFiniteGuard, AMPTrainer):
    """AMPTrainer that checks losses and weights; its GradScaler already skips steps with Inf gradients."""

    check_gradients = False
