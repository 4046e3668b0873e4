"""Bounding the gradients that reach box coordinates (MODEL.MNC.BOX_GRADIENTS).

Two bounds, each an identity in the forward pass:
- ``clip_box_gradient``: the gradient of the pixel-space box coordinates, elementwise (``CLIP``);
- ``clip_delta_gradient``: the authors' bound (``use_clip: 1, clip_base: 512`` on their
  ``proposal_layer`` and ``stage_bridge_layer``): the gradient of the predicted box DELTAS, after the chain
  rule through the anchor's / box's size, elementwise (``DELTA_CLIP``). Only the gradient flowing through
  the box path is clipped: the deltas' own regression loss reaches them untouched.
Each delta clip records the share of the non-zero delta gradients it changed as an event-storage scalar
(``box_gradients/<name>_clipped_fraction``), so that a bound that never binds is visible in training logs.
"""
import torch

from detectron2.utils.events import get_event_storage


def clip_box_gradient(boxes: torch.Tensor, clip: float) -> torch.Tensor:
    """Identity whose backward clips the gradient of ``boxes`` elementwise to [-clip, clip] (0 = off)."""
    if clip > 0 and boxes.requires_grad:
        boxes.register_hook(lambda grad: grad.clamp(-clip, clip))
    return boxes


class _ClipDeltaGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, deltas, bound, name):
        ctx.bound, ctx.name = bound, name
        return deltas.view_as(deltas)

    @staticmethod
    def backward(ctx, grad):
        nonzero = int((grad != 0).sum())
        clipped = int((grad.abs() > ctx.bound).sum())
        try:
            get_event_storage().put_scalar(f"box_gradients/{ctx.name}_clipped_fraction", clipped / max(nonzero, 1))
        except AssertionError:  # backward outside a trainer (no event storage)
            pass
        return grad.clamp(-ctx.bound, ctx.bound), None, None


def clip_delta_gradient(deltas: torch.Tensor, bound: float, name: str) -> torch.Tensor:
    """``deltas`` in the forward; in the backward the gradient through THIS use of them is clipped to
    [-bound, bound] and the clipped share is logged under ``name``. bound <= 0: no-op."""
    if bound <= 0 or not deltas.requires_grad:
        return deltas
    return _ClipDeltaGradient.apply(deltas, bound, name)
