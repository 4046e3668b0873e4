"""
Differentiable RoI warping (MNC's "RoI warping layer"): RoIAlign-style bilinear
sampling built on ``grid_sample`` from live box coordinates, so that gradients
reach both the features and the box corners (x0, y0, x1, y1).

Shape shorthand:
    N: images in the batch          C: feature channels
    H, W: feature map height, width R: RoIs (all images together)
    h, w: output size               S: sampling ratio (samples per bin side)

Forward values equal ``torchvision.ops.roi_align(..., aligned=True)`` (D2's
"ROIAlignV2") with a positive ``sampling_ratio``, including its border rule:
a sample with y < -1 or y > H (or x < -1 or x > W) is 0, and one inside
[-1, H] x [-1, W] reads the map at its coordinate clamped to [0, H-1] x [0, W-1].
Gradients w.r.t. a box coordinate are therefore 0 for samples that are zeroed or
clamped, and, as for any bilinear interpolation, undefined where a sample lies
exactly on an integer pixel coordinate (autograd then returns a one-sided value).
The level of a box (FPN) is a discrete choice and gets no gradient.

Cost: the samples are materialised before averaging, (R, C, h*S, w*S), i.e. S^2
times the output; RoIAlign's kernel averages on the fly. Sample positions are
computed in float32 (float64 for float64 features) whatever the feature dtype.
"""
import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import nonzero_tuple
from detectron2.modeling.poolers import assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes

__all__ = ["roi_warp", "ROIWarper"]


def _pair(output_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(output_size, int):
        return (output_size, output_size)
    output_size = tuple(int(s) for s in output_size)
    if len(output_size) != 2:
        raise ValueError(f"output_size must be an int or (h, w), got {output_size}")
    return output_size


def _sample_grid(
    start: torch.Tensor, length: torch.Tensor, num_samples: int, size: int
) -> torch.Tensor:
    """
    Sample positions along one axis, following RoIAlign(aligned=True), as grid_sample
    coordinates.

    Args:
        start: (R,) RoI start (already shifted by -0.5), in feature pixels.
        length: (R,) RoI length, in feature pixels.
        num_samples: output bins along the axis x sampling ratio.
        size: feature map size along the axis.

    Returns:
        (R, num_samples) normalised grid_sample coordinates (align_corners=False).
    """
    # Bin b, sample s sits at start + (b + (s + 0.5) / S) * length / bins
    # = start + (t + 0.5) * length / (bins * S) with t = b * S + s.
    steps = torch.arange(num_samples, device=start.device, dtype=start.dtype) + 0.5  # (T,)
    coords = start[:, None] + steps[None, :] * (length[:, None] / num_samples)  # (R, T)
    # RoIAlign's border rule: samples within one pixel outside the map read the border
    # pixel (clamp); samples further out are 0.
    coords_detached = coords.detach()
    inside = (coords_detached >= -1.0) & (coords_detached <= size)  # (R, T)
    coords = coords.clamp(min=0.0, max=size - 1)
    # grid_sample (align_corners=False) reads pixel p at normalised (2p + 1) / size - 1.
    grid = (2.0 * coords + 1.0) / size - 1.0  # (R, T)
    # -2 is more than a pixel outside the map: zero padding gives 0 and no gradient.
    return torch.where(inside, grid, torch.full_like(grid, -2.0))


def roi_warp(
    features: torch.Tensor,
    boxes: torch.Tensor,
    output_size: Union[int, Sequence[int]],
    spatial_scale: float,
    sampling_ratio: int,
) -> torch.Tensor:
    """
    RoIAlign(aligned=True) computed with ``grid_sample``, differentiable w.r.t. both
    ``features`` and the box coordinates ``boxes[:, 1:]``.

    Args:
        features: (N, C, H, W) feature maps.
        boxes: (R, 5) rows (batch_idx, x0, y0, x1, y1) in input-image coordinates
            (D2's pooler format). Gradient flows into columns 1..4; column 0 is an index.
        output_size: h or (h, w).
        spatial_scale: feature size / image size (1 / stride).
        sampling_ratio: S > 0, samples per bin side; each bin is the mean of S x S
            bilinear samples. The adaptive ratio 0 of RoIAlign is not supported.

    Returns:
        (R, C, h, w) warped features, in the order of ``boxes``.
    """
    if not isinstance(sampling_ratio, int) or sampling_ratio <= 0:
        raise ValueError(
            f"roi_warp needs a positive integer sampling_ratio, got {sampling_ratio!r}; "
            "the adaptive ratio 0 of RoIAlign depends on the box size and is not supported"
        )
    if features.dim() != 4 or boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(
            f"expected features (N, C, H, W) and boxes (R, 5), got "
            f"{tuple(features.shape)} and {tuple(boxes.shape)}"
        )
    out_h, out_w = _pair(output_size)
    num_images, num_channels, height, width = features.shape
    num_rois = boxes.shape[0]
    samples_h, samples_w = out_h * sampling_ratio, out_w * sampling_ratio

    # Image coordinates need float32 at least (half precision is ~1 px at 1000 px).
    coord_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    boxes = boxes.to(coord_dtype)
    output = features.new_zeros((num_rois, num_channels, out_h, out_w))  # (R, C, h, w)
    if num_rois == 0:
        # Keep empty outputs attached to the graph so that a loss over them backprops.
        return output + 0.0 * (features.sum() + boxes.sum())

    batch_idx = boxes[:, 0].detach().round().to(torch.int64)  # (R,)
    # aligned=True: shift by half a pixel, no clamp of the RoI size.
    x0 = boxes[:, 1] * spatial_scale - 0.5  # (R,)
    y0 = boxes[:, 2] * spatial_scale - 0.5
    roi_w = (boxes[:, 3] - boxes[:, 1]) * spatial_scale
    roi_h = (boxes[:, 4] - boxes[:, 2]) * spatial_scale
    grid_x = _sample_grid(x0, roi_w, samples_w, width)  # (R, Sw)
    grid_y = _sample_grid(y0, roi_h, samples_h, height)  # (R, Sh)
    grid = torch.stack(
        [
            grid_x[:, None, :].expand(num_rois, samples_h, samples_w),
            grid_y[:, :, None].expand(num_rois, samples_h, samples_w),
        ],
        dim=3,
    ).to(features.dtype)  # (R, Sh, Sw, 2)

    # One grid_sample per image: its RoIs' sample grids stacked along the height axis.
    per_image_outputs, per_image_inds = [], []
    for image_idx in range(num_images):
        inds = nonzero_tuple(batch_idx == image_idx)[0]  # (Ri,)
        if inds.numel() == 0:
            continue
        image_grid = grid[inds].reshape(1, -1, samples_w, 2)  # (1, Ri * Sh, Sw, 2)
        samples = F.grid_sample(
            features[image_idx : image_idx + 1],
            image_grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # (1, C, Ri * Sh, Sw)
        if sampling_ratio > 1:
            # RoIs are stacked in blocks of Sh rows, so S x S windows stay within a bin.
            samples = F.avg_pool2d(samples, sampling_ratio)  # (1, C, Ri * h, w)
        pooled = samples.view(num_channels, -1, out_h, out_w).transpose(0, 1)  # (Ri, C, h, w)
        per_image_outputs.append(pooled)
        per_image_inds.append(inds)

    if len(per_image_outputs) == 1 and per_image_inds[0].numel() == num_rois:
        # Common case (one image, or RoIs of a single image): RoIs already in order.
        return per_image_outputs[0].contiguous()
    # index_put_ rather than advanced-index assignment: pytorch/issues/49852.
    for pooled, inds in zip(per_image_outputs, per_image_inds):
        output.index_put_((inds,), pooled)
    return output


class ROIWarper(nn.Module):
    """
    Drop-in for D2's ``ROIPooler`` (same ``forward`` signature) whose output is
    differentiable w.r.t. the box coordinates. Values equal ``ROIPooler`` with
    ``pooler_type="ROIAlignV2"`` and the same positive ``sampling_ratio``.
    """

    def __init__(
        self,
        output_size: Union[int, Sequence[int]],
        scales: List[float],
        sampling_ratio: int,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        """
        Args:
            output_size: h or (h, w) of the warped features.
            scales: 1 / stride of each feature level, finest first; strides must be
                consecutive powers of 2 (as in ``ROIPooler``).
            sampling_ratio: S > 0 samples per bin side.
            canonical_box_size, canonical_level: FPN level assignment (Eqn. 1 of FPN),
                as in ``ROIPooler``.
        """
        super().__init__()
        if not isinstance(sampling_ratio, int) or sampling_ratio <= 0:
            raise ValueError(
                f"ROIWarper needs a positive integer sampling_ratio, got {sampling_ratio!r}"
            )
        self.output_size = _pair(output_size)
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = sampling_ratio
        min_level = -math.log2(self.scales[0])
        max_level = -math.log2(self.scales[-1])
        if not (
            math.isclose(min_level, round(min_level)) and math.isclose(max_level, round(max_level))
        ):
            raise ValueError(f"feature map strides must be powers of 2, got scales {scales}")
        self.min_level = int(round(min_level))
        self.max_level = int(round(max_level))
        if len(self.scales) != self.max_level - self.min_level + 1 or self.min_level < 0:
            raise ValueError(f"scales {scales} do not form a pyramid")
        if canonical_box_size <= 0:
            raise ValueError("canonical_box_size must be positive")
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """
        Args:
            x: one (N, C, Hl, Wl) feature map per level, finest first.
            box_lists: N Boxes in input-image coordinates. Their tensors keep their
                autograd graph: gradients flow into them.

        Returns:
            (R, C, h, w) warped features, R = total boxes, in the order of ``box_lists``.
        """
        if not isinstance(x, list) or not isinstance(box_lists, list):
            raise TypeError("Arguments to ROIWarper must be lists")
        if len(x) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} feature levels, got {len(x)}")
        if len(box_lists) != x[0].shape[0]:
            raise ValueError(
                f"x[0] has batch size {x[0].shape[0]} but box_lists has {len(box_lists)} entries"
            )
        num_channels = x[0].shape[1]
        if len(box_lists) == 0:
            return x[0].new_zeros((0, num_channels) + self.output_size)

        pooler_fmt_boxes = convert_boxes_to_pooler_format(box_lists)  # (R, 5), keeps grad
        if len(x) == 1 or pooler_fmt_boxes.shape[0] == 0:
            return roi_warp(
                x[0], pooler_fmt_boxes, self.output_size, self.scales[0], self.sampling_ratio
            )

        # The level choice is discrete: no gradient through it.
        level_assignments = assign_boxes_to_levels(
            [Boxes(b.tensor.detach()) for b in box_lists],
            self.min_level,
            self.max_level,
            self.canonical_box_size,
            self.canonical_level,
        )  # (R,)
        output = x[0].new_zeros((pooler_fmt_boxes.shape[0], num_channels) + self.output_size)
        for level, (features, scale) in enumerate(zip(x, self.scales)):
            inds = nonzero_tuple(level_assignments == level)[0]  # (Rl,)
            if inds.numel() == 0:
                continue
            warped = roi_warp(
                features, pooler_fmt_boxes[inds], self.output_size, scale, self.sampling_ratio
            )  # (Rl, C, h, w)
            # index_put_ rather than advanced-index assignment: pytorch/issues/49852.
            output.index_put_((inds,), warped)
        return output

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={self.scales}, "
            f"sampling_ratio={self.sampling_ratio}"
        )
