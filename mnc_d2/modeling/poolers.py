"""D2's ROIPooler with the RoIs of each FPN level split across threads on CPU.

torchvision's CPU ``roi_align`` kernel runs on one thread, whatever ``torch.get_num_threads()`` says,
and MNC pools every one of its 300 test RoIs at 14x14 (Mask R-CNN's mask head pools only the
detections). The kernel releases the GIL, so pooling disjoint chunks of RoIs from Python threads
gives the same output (bit for bit: every RoI is pooled by the same kernel) on all the cores torch
may use. Used at inference (no autograd); on CUDA, with one thread, or in training (unless
``parallel_backward_graph``) this is D2's ROIPooler unchanged.

Shape shorthand: R = RoIs over the batch, C = channels, P = output side.
"""
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch

from detectron2.layers import nonzero_tuple
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes

__all__ = ["ParallelROIPooler"]

_EXECUTOR: Optional[ThreadPoolExecutor] = None
_EXECUTOR_LOCK = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool, rebuilt when torch's thread count changes."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR._max_workers != workers:
            if _EXECUTOR is not None:
                _EXECUTOR.shutdown(wait=False)
            _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mnc_roi_pool")
        return _EXECUTOR


class ParallelROIPooler(ROIPooler):
    """:class:`detectron2.modeling.poolers.ROIPooler`, with the RoIs pooled by up to
    ``torch.get_num_threads()`` threads on CPU (``min_rois_per_thread`` RoIs at least per thread)."""

    def __init__(self, *args, min_rois_per_thread: int = 16, parallel_backward_graph: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_rois_per_thread = min_rois_per_thread
        # With autograd on (training) D2's path is kept by default: the backward is single-threaded
        # either way, and measured on 2 cores the threaded forward did not pay off in a training step.
        self.parallel_backward_graph = parallel_backward_graph

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """x: per level (N, C, H_l, W_l); box_lists: N Boxes -> (R, C, P, P), in box order."""
        threads = torch.get_num_threads()
        num_rois = sum(len(b) for b in box_lists)
        grad_enabled = torch.is_grad_enabled()  # grad mode is per thread: carried over to the workers below
        needs_grad = grad_enabled and any(t.requires_grad for t in x)
        if (x[0].is_cuda or threads < 2 or num_rois < 2 * self.min_rois_per_thread or torch.jit.is_scripting()
                or torch.jit.is_tracing()  # the chunking below depends on the RoI count: a trace would freeze it
                or (needs_grad and not self.parallel_backward_graph)):
            return super().forward(x, box_lists)
        assert len(x) == len(self.level_poolers) and len(box_lists) == x[0].size(0)

        pooler_fmt_boxes = convert_boxes_to_pooler_format(box_lists)  # (R, 5): image index, x0, y0, x1, y1
        if len(self.level_poolers) == 1:
            level_assignments = torch.zeros(num_rois, dtype=torch.int64)
        else:
            level_assignments = assign_boxes_to_levels(
                box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
            )  # (R,)
        tasks = []  # (RoI indices, level)
        for level in range(len(self.level_poolers)):
            inds = nonzero_tuple(level_assignments == level)[0]
            pieces = max(1, min(threads, len(inds) // self.min_rois_per_thread))
            tasks.extend((chunk, level) for chunk in inds.tensor_split(pieces) if len(chunk))

        def pool(inds: torch.Tensor, level: int) -> torch.Tensor:
            with torch.set_grad_enabled(grad_enabled):
                return self.level_poolers[level](x[level], pooler_fmt_boxes[inds])  # (r, C, P, P)

        executor = _executor(threads)
        futures = [executor.submit(pool, inds, level) for inds, level in tasks]
        output = x[0].new_zeros((num_rois, x[0].shape[1], *self.output_size))  # (R, C, P, P)
        for (inds, _), future in zip(tasks, futures):
            output.index_put_((inds,), future.result())
        return output
