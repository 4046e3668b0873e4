"""
MNC mask voting (inference): every kept instance's mask becomes the score-weighted
mean of the image-space soft masks of all candidates of its class whose box has
IoU >= ``iou_threshold`` with its box; the mean is binarised at ``mask_threshold``
and its tight box becomes the output box.

Shape shorthand:
    N: candidates (all stages merged)   K: kept instances (after NMS)
    M: mask side (Mh x Mw)              H, W: image height, width
    P: voting pairs (kept k, candidate j voting for k)
    Hf, Wf: size of a voting frame      V: most voters of one kept instance in a chunk

Pasting follows D2's ``paste_masks_in_image`` / ``_do_paste_mask`` over the whole
image (D2's GPU path): image pixel centres ``(x + 0.5, y + 0.5)`` sampled from the
M x M mask stretched over its box by bilinear ``grid_sample`` (align_corners=False,
zero padding), soft values kept. D2's CPU path additionally crops each pasted mask
to its box +- 1 pixel; the two differ only on the bilinear fringe outside the box
(at most half a mask cell wide).

How it is computed. Bilinear sampling on an axis-aligned pixel grid is separable:
pasted_j = Ry_j @ mask_j @ Rx_j^T, with Ry_j (Hf, M) and Rx_j (Wf, M) the 1-D
interpolation weights ("tent" weights, zero outside the mask = zero padding). The
weighted sum of voter masks of kept instance k is then one matrix product,
[w_1 Ry_1, ..., w_n Ry_n] @ [mask_1 Rx_1^T; ...; mask_n Rx_n^T], batched over
kept instances. Each kept instance is voted inside its own frame: the bounding
box of its voters' pasted supports, outside which every voter pastes exactly 0.
Memory stays bounded: frames are processed in chunks of at most ``chunk_size``
elements, and nothing of size (P, Hf, Wf) or (N, H, W) is ever built.
"""
import math
from typing import List, Optional, Tuple

import torch

from detectron2.structures import Boxes, pairwise_iou

__all__ = ["mask_voting"]


def _plan_chunks(
    frame_hw: List[Tuple[int, int]], num_voters: List[int], budget: int
) -> List[List[int]]:
    """
    Group kept instances whose frames and voter lists get padded to a common size.

    Greedy over frames sorted by area (largest first): an instance joins the current
    group unless padding would more than triple the group's real work (voters x frame
    pixels), beyond a small allowance, or the group's accumulator would exceed ``budget``
    pixels. Few groups matter more than the padded work: the matrix products are cheap,
    the per-group overhead (a dozen small ops, a host sync) is not. Instances without
    voters or with an empty frame need no work.

    Args:
        frame_hw: (h, w) frame size of each kept instance.
        num_voters: number of voters of each kept instance.
        budget: most accumulator pixels per group.

    Returns:
        Groups of kept indices.
    """
    order = sorted(range(len(frame_hw)), key=lambda i: -frame_hw[i][0] * frame_hw[i][1])
    groups: List[List[int]] = []
    group: List[int] = []
    group_h = group_w = group_voters = group_work = 0
    for i in order:
        h, w = frame_hw[i]
        if num_voters[i] == 0 or h * w == 0:
            continue
        new_h, new_w = max(group_h, h), max(group_w, w)
        new_voters = max(group_voters, num_voters[i])
        new_work = group_work + num_voters[i] * h * w
        padded_work = (len(group) + 1) * new_voters * new_h * new_w
        too_wasteful = padded_work - new_work > max(2.0 * new_work, 1 << 18)
        too_big = (len(group) + 1) * new_h * new_w > budget
        if group and (too_wasteful or too_big):
            groups.append(group)
            group = []
            new_h, new_w, new_voters, new_work = h, w, num_voters[i], num_voters[i] * h * w
        group.append(i)
        group_h, group_w, group_voters, group_work = new_h, new_w, new_voters, new_work
    if group:
        groups.append(group)
    return groups


def _interpolation_weights(
    origin: torch.Tensor, length: int, box_start: torch.Tensor, box_end: torch.Tensor, size: int
) -> torch.Tensor:
    """
    1-D bilinear weights of D2's mask pasting along one axis.

    Args:
        origin: (P,) image coordinate of the first frame pixel.
        length: frame pixels along the axis.
        box_start, box_end: (P,) box extent along the axis.
        size: mask cells along the axis.

    Returns:
        (P, length, size) weight of mask cell m for frame pixel i.
    """
    pixel_centres = origin[:, None].float() + (
        torch.arange(length, device=origin.device, dtype=torch.float32) + 0.5
    )  # (P, length)
    # The same float32 arithmetic as _do_paste_mask followed by grid_sample's
    # unnormalisation (align_corners=False).
    grid = (pixel_centres - box_start[:, None]) / (box_end - box_start)[:, None] * 2 - 1
    source = ((grid + 1) * size - 1) / 2  # (P, length) position in mask cells
    cells = torch.arange(size, device=origin.device, dtype=torch.float32)
    # Tent kernel = bilinear weights; cells outside [0, size) are absent = zero padding.
    return (1 - (source[:, :, None] - cells).abs()).clamp(min=0)  # (P, length, size)


def mask_voting(
    boxes: torch.Tensor,
    masks: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    keep: torch.Tensor,
    image_size: Tuple[int, int],
    iou_threshold: float = 0.5,
    mask_threshold: float = 0.4,
    chunk_size: int = 1 << 23,
    fallback_boxes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        boxes: (N, 4) XYXY boxes in image coordinates, the box each mask was predicted in.
        masks: (N, Mh, Mw) soft mask probabilities in [0, 1].
        scores: (N,) non-negative candidate scores (the voting weights).
        classes: (N,) int64 class of each candidate.
        keep: (K,) int64 indices into N of the kept instances (e.g. after NMS).
        image_size: (H, W).
        iou_threshold: candidate j votes for kept instance k if they have the same class
            and IoU(box_k, box_j) >= iou_threshold. A kept instance always votes for itself.
        mask_threshold: the voted soft mask is binarised with ``>=``; must be > 0.
        chunk_size: about the most float elements per working tensor (accumulator, factor
            matrices); peak extra memory ~ 4 x 4 bytes x chunk_size (~130 MB at the
            default) besides the (K, H, W) bool output. A single frame larger than
            chunk_size is still processed whole.
        fallback_boxes: (K, 4) output box of a kept instance whose voted mask is empty (MNC: its
            regressed box); None = the box its mask was predicted in, ``boxes[keep]``.

    Returns:
        voted_masks: (K, H, W) bool.
        voted_boxes: (K, 4) tight XYXY boxes of ``voted_masks`` (pixel (x, y) spans
            [x, x + 1) x [y, y + 1), as in ``BitMasks.get_bounding_boxes``); the kept
            ``fallback_boxes`` where the voted mask is empty.

    Candidates with a non-finite or empty (x1 <= x0 or y1 <= y0) box never vote.
    """
    if not mask_threshold > 0:
        raise ValueError(f"mask_threshold must be > 0, got {mask_threshold}")
    if masks.dim() != 3 or masks.shape[0] != boxes.shape[0] or boxes.shape[-1] != 4:
        raise ValueError(
            f"expected boxes (N, 4) and masks (N, M, M), got {tuple(boxes.shape)} and "
            f"{tuple(masks.shape)}"
        )
    img_h, img_w = int(image_size[0]), int(image_size[1])
    device = boxes.device
    num_kept = keep.numel()
    voted_masks = torch.zeros((num_kept, img_h, img_w), dtype=torch.bool, device=device)
    # (K, 4), the fall-back for empty voted masks
    voted_boxes = (boxes[keep] if fallback_boxes is None else fallback_boxes).clone().to(boxes.dtype)
    if num_kept == 0 or img_h == 0 or img_w == 0:
        return voted_masks, voted_boxes

    mask_h, mask_w = masks.shape[-2:]
    boxes_f = boxes.float()  # (N, 4), D2 pastes in float32
    widths = boxes_f[:, 2] - boxes_f[:, 0]  # (N,)
    heights = boxes_f[:, 3] - boxes_f[:, 1]
    valid = torch.isfinite(boxes_f).all(dim=1) & (widths > 0) & (heights > 0)  # (N,)

    # Who votes for whom: same class, IoU >= threshold, valid box; k always votes for itself.
    iou = pairwise_iou(Boxes(boxes_f[keep]), Boxes(boxes_f))  # (K, N)
    votes = (iou >= iou_threshold) & (classes[keep][:, None] == classes[None, :])  # (K, N)
    votes[torch.arange(num_kept, device=device), keep] = True
    votes &= valid[None, :]

    # A pasted mask is non-zero only where the source position lies in (-1, M), i.e.
    # within half a mask cell (box side / 2M) of its box. The frame of k is the
    # bounding box of its voters' supports (one pixel margin for rounding), clipped to
    # the image: outside it every voter pastes exactly 0, which is below mask_threshold.
    fringe_x = widths / (2 * mask_w)  # (N,)
    fringe_y = heights / (2 * mask_h)
    support = torch.stack(
        [
            boxes_f[:, 0] - fringe_x,
            boxes_f[:, 1] - fringe_y,
            boxes_f[:, 2] + fringe_x,
            boxes_f[:, 3] + fringe_y,
        ],
        dim=1,
    )  # (N, 4)
    support = torch.where(valid[:, None], support, torch.zeros_like(support))
    inf = torch.tensor(math.inf, device=device)
    frame_x0 = torch.where(votes, support[None, :, 0], inf).amin(dim=1)  # (K,)
    frame_y0 = torch.where(votes, support[None, :, 1], inf).amin(dim=1)
    frame_x1 = torch.where(votes, support[None, :, 2], -inf).amax(dim=1)
    frame_y1 = torch.where(votes, support[None, :, 3], -inf).amax(dim=1)
    has_voters = votes.any(dim=1)  # (K,)
    frames = torch.stack(
        [
            (frame_x0.floor() - 1).clamp(0, img_w),
            (frame_y0.floor() - 1).clamp(0, img_h),
            (frame_x1.ceil() + 1).clamp(0, img_w),
            (frame_y1.ceil() + 1).clamp(0, img_h),
        ],
        dim=1,
    )  # (K, 4) integer-valued [x0, y0, x1, y1)
    frames = torch.where(has_voters[:, None], frames, torch.zeros_like(frames)).long()
    frame_w = (frames[:, 2] - frames[:, 0]).clamp(min=0)  # (K,)
    frame_h = (frames[:, 3] - frames[:, 1]).clamp(min=0)

    pair_kept, pair_cand = votes.nonzero(as_tuple=True)  # (P,) each, sorted by kept index
    pair_weights = scores.float()[pair_cand]  # (P,)
    total_weights = torch.zeros(num_kept, device=device).index_add_(0, pair_kept, pair_weights)
    num_voters = torch.bincount(pair_kept, minlength=num_kept)  # (K,)
    first_pair = torch.cumsum(num_voters, 0) - num_voters  # (K,)
    pair_slot = torch.arange(len(pair_kept), device=device) - first_pair[pair_kept]  # (P,)
    # Bilinear pasting is linear: weight the small masks rather than the pasted frames.
    weighted_masks = masks.float()[pair_cand] * pair_weights[:, None, None]  # (P, Mh, Mw)

    # Chunk plan on the host (the sizes are data dependent).
    num_voters_host = num_voters.tolist()
    frame_hw_host = torch.stack([frame_h, frame_w], dim=1).tolist()
    groups = _plan_chunks(frame_hw_host, num_voters_host, chunk_size)
    kept_to_local = torch.zeros(num_kept, dtype=torch.long, device=device)  # (K,)
    for group in groups:
        group_size = len(group)
        chunk_kept = torch.tensor(group, device=device)  # (Kc,)
        chunk_h = max(frame_hw_host[i][0] for i in group)
        chunk_w = max(frame_hw_host[i][1] for i in group)
        max_voters = max(num_voters_host[i] for i in group)
        # Frames padded to (Hf, Wf), shifted back inside the image where needed; the
        # padding lies outside the frame, where every voter pastes 0.
        origin_x = frames[chunk_kept, 0].clamp(max=img_w - chunk_w)  # (Kc,)
        origin_y = frames[chunk_kept, 1].clamp(max=img_h - chunk_h)
        kept_to_local[chunk_kept] = torch.arange(group_size, device=device)

        accumulated = torch.zeros(
            (group_size, chunk_h, chunk_w), device=device
        )  # (Kc, Hf, Wf) sum over voters j of w_j * pasted mask_j
        # Voter slots per step, so that the factor matrices stay within chunk_size.
        slots_per_step = max(
            1, chunk_size // (group_size * (mask_h * chunk_h + mask_w * chunk_w))
        )
        in_group = torch.zeros(num_kept, dtype=torch.bool, device=device)
        in_group[chunk_kept] = True
        group_pairs = in_group[pair_kept].nonzero(as_tuple=True)[0]  # (Pg,)
        for slot_start in range(0, max_voters, slots_per_step):
            num_slots = min(slots_per_step, max_voters - slot_start)
            slot = pair_slot[group_pairs] - slot_start  # (Pg,)
            pairs = group_pairs[(slot >= 0) & (slot < num_slots)]  # (Pc,)
            slot = pair_slot[pairs] - slot_start
            local = kept_to_local[pair_kept[pairs]]  # (Pc,)
            cand = pair_cand[pairs]  # (Pc,)
            rows = _interpolation_weights(
                origin_y[local], chunk_h, boxes_f[cand, 1], boxes_f[cand, 3], mask_h
            )  # (Pc, Hf, Mh)
            cols = _interpolation_weights(
                origin_x[local], chunk_w, boxes_f[cand, 0], boxes_f[cand, 2], mask_w
            )  # (Pc, Wf, Mw)
            # Left factor [Ry_1, ..., Ry_n], right factor [w_1 mask_1 Rx_1^T; ...].
            left = accumulated.new_zeros((group_size, chunk_h, num_slots, mask_h))
            left[local, :, slot] = rows
            right = accumulated.new_zeros((group_size, num_slots, mask_h, chunk_w))
            right[local, slot] = torch.bmm(weighted_masks[pairs], cols.transpose(1, 2))
            accumulated.baddbmm_(
                left.view(group_size, chunk_h, num_slots * mask_h),
                right.view(group_size, num_slots * mask_h, chunk_w),
            )
        voted = accumulated / total_weights[chunk_kept].clamp(min=1e-12)[:, None, None]
        voted_binary = voted >= mask_threshold  # (Kc, Hf, Wf)

        frame_rows = origin_y[:, None] + torch.arange(chunk_h, device=device)  # (Kc, Hf)
        frame_cols = origin_x[:, None] + torch.arange(chunk_w, device=device)  # (Kc, Wf)
        voted_masks[
            chunk_kept[:, None, None], frame_rows[:, :, None], frame_cols[:, None, :]
        ] = voted_binary

        # Tight boxes, computed in the frame.
        row_any = voted_binary.any(dim=2)  # (Kc, Hf)
        col_any = voted_binary.any(dim=1)  # (Kc, Wf)
        nonempty = row_any.any(dim=1)  # (Kc,)
        y_min = row_any.byte().argmax(dim=1)  # first True
        y_max = chunk_h - 1 - row_any.flip(1).byte().argmax(dim=1)  # last True
        x_min = col_any.byte().argmax(dim=1)
        x_max = chunk_w - 1 - col_any.flip(1).byte().argmax(dim=1)
        tight = torch.stack(
            [x_min + origin_x, y_min + origin_y, x_max + 1 + origin_x, y_max + 1 + origin_y],
            dim=1,
        )  # (Kc, 4)
        voted_boxes[chunk_kept[nonempty]] = tight[nonempty].to(voted_boxes.dtype)

    return voted_masks, voted_boxes
