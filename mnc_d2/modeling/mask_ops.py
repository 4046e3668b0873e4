"""Pure tensor functions for MNC's mask stages.

Shape shorthand: R = RoIs, C = feature channels, P = RoI feature side (14 in the reference),
M = predicted mask side (21 in the reference), H x W = image.
"""
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from detectron2.structures import BitMasks, PolygonMasks


def mask_targets(gt_masks, rois: torch.Tensor, mask_size: int, threshold: float) -> torch.Tensor:
    """
    GT mask of each RoI's matched instance, cropped to the RoI, resized to ``mask_size`` and
    binarised at ``threshold`` (MNC: 0.4; D2's ``crop_and_resize`` uses 0.5).

    Args:
        gt_masks: BitMasks (R, H, W) or PolygonMasks of length R (polygons are rasterised directly
            at ``mask_size`` by D2, so ``threshold`` does not apply to them).
        rois: (R, 4) XYXY boxes, no gradient.
    Returns:
        (R, M, M) float targets in {0, 1}.
    """
    rois = rois.detach()
    if isinstance(gt_masks, PolygonMasks):
        return gt_masks.crop_and_resize(rois, mask_size).to(dtype=torch.float32)
    if isinstance(gt_masks, BitMasks):
        gt_masks = gt_masks.tensor
    masks = gt_masks.to(device=rois.device, dtype=torch.float32)  # (R, H, W)
    if rois.numel() == 0:
        return masks.new_zeros((0, mask_size, mask_size))
    batch_inds = torch.arange(len(rois), device=rois.device, dtype=rois.dtype)[:, None]
    soft = roi_align(masks[:, None], torch.cat([batch_inds, rois], dim=1), (mask_size, mask_size),
                     1.0, 0, aligned=True).squeeze(1)  # (R, M, M)
    return (soft >= threshold).to(dtype=torch.float32)


def mask_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """
    Sigmoid cross-entropy of class-agnostic masks, averaged over pixels of the foreground RoIs.

    Args:
        mask_logits: (F, 1, M, M) or (F, M, M) logits of the foreground RoIs.
        targets: (F, M, M) in {0, 1}.
    """
    mask_logits = mask_logits.reshape(targets.shape[0], *targets.shape[-2:]) if targets.numel() else mask_logits
    if targets.numel() == 0:
        return mask_logits.sum() * 0  # keeps the graph so backward works on empty batches
    return F.binary_cross_entropy_with_logits(mask_logits, targets, reduction="mean")


def mask_pooled_features(roi_features: torch.Tensor, mask_probs: torch.Tensor) -> torch.Tensor:
    """
    Stage 3's segment pathway input: RoI features multiplied by the stage-2 soft mask, resized
    (bilinearly, not binarised) to the RoI feature size and broadcast over channels.

    Args:
        roi_features: (R, C, P, P)
        mask_probs: (R, 1, M, M) probabilities in [0, 1], WITH gradient (stage 3 trains the mask head).
    Returns:
        (R, C, P, P)
    """
    resized = F.interpolate(mask_probs, size=roi_features.shape[-2:], mode="bilinear", align_corners=False)
    return roi_features * resized  # (R, C, P, P) * (R, 1, P, P)


def binary_mask_iou_with_targets(mask_probs: torch.Tensor, targets: torch.Tensor, threshold: float) -> torch.Tensor:
    """
    IoU, per RoI, between the binarised predicted mask and the mask target, both in the RoI frame
    (used for the segment-aware classifier's labels).

    Args:
        mask_probs: (R, 1, M, M) or (R, M, M); targets: (R, M, M) in {0, 1}.
    Returns:
        (R,) IoU in [0, 1] (0 where both are empty).
    """
    pred = (mask_probs.reshape(targets.shape) >= threshold)
    gt = targets > 0.5
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return inter / union.clamp(min=1.0)


def segment_iou_with_whole_gt(mask_probs: torch.Tensor, targets: torch.Tensor, roi_areas: torch.Tensor,
                              gt_areas: torch.Tensor, threshold: float) -> torch.Tensor:
    """
    IoU, per RoI, between the binarised predicted mask pasted in its RoI and the WHOLE ground-truth mask
    of its object (the authors' ``mask_overlap`` for segment labels). The predicted mask is zero outside
    its RoI, so the intersection lies inside the RoI and is measured on the M x M grid (against the GT
    cropped to the RoI, i.e. the mask target); the union adds the whole GT area: a perfect half-mask in
    a half-object RoI scores 0.5, not 1.

    Args:
        mask_probs: (R, 1, M, M) or (R, M, M) predicted probabilities; targets: (R, M, M) GT inside the RoI.
        roi_areas: (R,) RoI areas in pixels; gt_areas: (R,) areas of the whole GT masks in pixels.
    Returns:
        (R,) IoU in [0, 1] (0 where both are empty).
    """
    pred = (mask_probs.reshape(targets.shape) >= threshold).flatten(1).float()  # (R, M*M)
    cell_area = roi_areas / pred.shape[1]  # (R,) pixels per mask cell
    inter = (pred * (targets.flatten(1) > 0.5)).sum(1) * cell_area  # (R,)
    union = pred.sum(1) * cell_area + gt_areas.to(inter.dtype) - inter
    return (inter / union.clamp(min=1e-6)).clamp(max=1.0)


def max_pool_square(x: torch.Tensor, k: int) -> torch.Tensor:
    """(R, C, P, P) -> (R, C, P/k, P/k): ``F.max_pool2d(x, k)`` for P divisible by k, computed as
    the maximum of the k*k strided views (on CPU, 6-7x faster than the max_pool2d kernel on
    NCHW RoI features; the values are identical)."""
    if k <= 1:
        return x
    if x.shape[-1] % k or x.shape[-2] % k:
        raise ValueError(f"max_pool_square: side {tuple(x.shape[-2:])} is not divisible by {k}")
    out = x[..., 0::k, 0::k]
    for dy in range(k):
        for dx in range(k):
            if dy or dx:
                out = torch.maximum(out, x[..., dy::k, dx::k])
    return out
