import time

import pytest
import torch
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.structures import BitMasks, Boxes, pairwise_iou
from torchvision.ops import batched_nms

from mnc_d2.modeling.mask_voting import mask_voting

# With 16 x 16 masks in 16 x 16 boxes at integer coordinates, D2's pasting copies the
# mask cells onto the pixels exactly (every sample lands on a cell centre), so voted
# values can be computed by hand.
SIDE = 16
IMAGE = (40, 48)  # (H, W)
BOX_A = [8.0, 8.0, 24.0, 24.0]
BOX_B = [12.0, 8.0, 28.0, 24.0]  # A shifted right by 4 px: IoU(A, B) = 192 / 320 = 0.6
BOX_FAR = [20.0, 8.0, 36.0, 24.0]  # IoU(A, FAR) = 64 / 448 ~ 0.14


def _ones(n):
    return torch.ones(n, SIDE, SIDE)


def _rect(x0, y0, x1, y1):
    out = torch.zeros(IMAGE, dtype=torch.bool)
    out[y0:y1, x0:x1] = True
    return out


def reference_mask_voting(
    boxes, masks, scores, classes, keep, image_size, iou_threshold=0.5, mask_threshold=0.4
):
    """Slow reference: one candidate at a time, each pasted over the whole image with
    D2's _do_paste_mask. Returns the voted soft masks (K, H, W)."""
    img_h, img_w = image_size
    iou = pairwise_iou(Boxes(boxes[keep]), Boxes(boxes))
    soft = []
    for row, k in enumerate(keep.tolist()):
        total = torch.zeros(image_size)
        weight = 0.0
        for j in range(len(boxes)):
            if j != k and not (classes[j] == classes[k] and iou[row, j] >= iou_threshold):
                continue
            pasted, _ = _do_paste_mask(
                masks[j][None, None].float(), boxes[j][None].float(), img_h, img_w, False
            )
            total += scores[j] * pasted[0]
            weight += float(scores[j])
        soft.append(total / weight)
    return torch.stack(soft) if soft else torch.zeros((0,) + tuple(image_size))


def test_two_full_masks_weighted_by_score():
    boxes = torch.tensor([BOX_A, BOX_B])
    classes = torch.tensor([3, 3])
    keep = torch.tensor([0])
    # Weights 0.75 / 0.25: x in [8, 12) -> 0.75, [12, 24) -> 1, [24, 28) -> 0.25.
    masks, voted_boxes = mask_voting(
        boxes, _ones(2), torch.tensor([0.75, 0.25]), classes, keep, IMAGE
    )
    assert masks.shape == (1,) + IMAGE and masks.dtype == torch.bool
    assert torch.equal(masks[0], _rect(8, 8, 24, 24))
    assert voted_boxes.tolist() == [[8.0, 8.0, 24.0, 24.0]]
    # Weights 0.25 / 0.75: the low-scoring kept box moves onto the strong voter.
    masks, voted_boxes = mask_voting(
        boxes, _ones(2), torch.tensor([0.25, 0.75]), classes, keep, IMAGE
    )
    assert torch.equal(masks[0], _rect(12, 8, 28, 24))
    assert voted_boxes.tolist() == [[12.0, 8.0, 28.0, 24.0]]


def test_soft_mask_values_are_averaged_before_thresholding():
    # Kept A: mask 1 on its left half, 0.25 on its right half; voter B: all 0.625.
    mask_a = torch.full((SIDE, SIDE), 0.25)
    mask_a[:, : SIDE // 2] = 1.0
    masks = torch.stack([mask_a, torch.full((SIDE, SIDE), 0.625)])
    boxes = torch.tensor([BOX_A, BOX_B])
    voted, voted_boxes = mask_voting(
        boxes, masks, torch.tensor([0.5, 0.5]), torch.tensor([1, 1]), torch.tensor([0]), IMAGE
    )
    # Mean over both voters (weights 1/2 each): x in [8, 12): A=1 alone -> 0.5;
    # [12, 16): (1 + 0.625) / 2 = 0.8125; [16, 24): (0.25 + 0.625) / 2 = 0.4375;
    # [24, 28): 0.625 / 2 = 0.3125. Threshold 0.4 keeps x in [8, 24), 0.5 keeps [8, 16).
    assert torch.equal(voted[0], _rect(8, 8, 24, 24))
    voted, voted_boxes = mask_voting(
        boxes,
        masks,
        torch.tensor([0.5, 0.5]),
        torch.tensor([1, 1]),
        torch.tensor([0]),
        IMAGE,
        mask_threshold=0.5,
    )
    assert torch.equal(voted[0], _rect(8, 8, 16, 24))
    assert voted_boxes.tolist() == [[8.0, 8.0, 16.0, 24.0]]


@pytest.mark.parametrize("threshold,voted_nonempty", [(0.4, True), (0.4375, True), (0.5, False)])
def test_threshold_boundary(threshold, voted_nonempty):
    # A is all 0, B all 1, weights 9/16 and 7/16 (exact in binary). The mean is over
    # all voters (denominator 1), so every pixel of B votes exactly 7/16 = 0.4375.
    masks = torch.stack([torch.zeros(SIDE, SIDE), torch.ones(SIDE, SIDE)])
    boxes = torch.tensor([BOX_A, BOX_B])
    voted, voted_boxes = mask_voting(
        boxes,
        masks,
        torch.tensor([0.5625, 0.4375]),
        torch.tensor([0, 0]),
        torch.tensor([0]),
        IMAGE,
        mask_threshold=threshold,
    )
    if voted_nonempty:
        assert torch.equal(voted[0], _rect(12, 8, 28, 24))
        assert voted_boxes.tolist() == [BOX_B]
    else:
        assert not voted.any()
        assert voted_boxes.tolist() == [BOX_A]  # fall-back: the kept box


def test_other_class_and_low_iou_candidates_are_ignored():
    boxes = torch.tensor([BOX_A, BOX_A, BOX_FAR, BOX_B])
    classes = torch.tensor([0, 1, 0, 0])
    scores = torch.tensor([0.5, 0.9, 0.9, 0.5])
    masks = torch.stack([torch.ones(SIDE, SIDE), torch.zeros(SIDE, SIDE)] + [_ones(1)[0]] * 2)
    voted, _ = mask_voting(boxes, masks, scores, classes, torch.tensor([0]), IMAGE)
    # Only A (self) and B vote: 0.5 each -> union of A and B. The zero mask of class 1
    # on the same box would otherwise pull A's left strip down to 0.5 / 1.9 < 0.4, and
    # FAR (IoU 0.14) would add x in [28, 36).
    assert torch.equal(voted[0], _rect(8, 8, 28, 24))
    # The IoU threshold is a parameter: at 0.7, B no longer votes either.
    voted, _ = mask_voting(
        boxes, masks, scores, classes, torch.tensor([0]), IMAGE, iou_threshold=0.7
    )
    assert torch.equal(voted[0], _rect(8, 8, 24, 24))


def test_kept_instance_always_votes_for_itself():
    boxes = torch.tensor([BOX_A, BOX_A])
    masks = torch.stack([torch.ones(SIDE, SIDE), torch.zeros(SIDE, SIDE)])
    voted, _ = mask_voting(
        boxes, masks, torch.tensor([0.5, 0.5]), torch.tensor([0, 0]), torch.tensor([0]), IMAGE,
        iou_threshold=1.01,
    )
    assert torch.equal(voted[0], _rect(8, 8, 24, 24))


def test_bilinear_fringe_outside_the_box_is_kept():
    # 2 x 2 mask of ones in a 32 px box: each cell is 16 px and the bilinear fringe
    # reaches 8 px beyond the box. Pixel centre 8.5 samples the mask at -0.59375 cells
    # (value 0.40625 >= 0.4), 7.5 at -0.65625 (0.34375); symmetrically on the far side.
    boxes = torch.tensor([[10.0, 10.0, 42.0, 42.0]])
    voted, voted_boxes = mask_voting(
        boxes, torch.ones(1, 2, 2), torch.ones(1), torch.zeros(1, dtype=torch.long),
        torch.tensor([0]), (50, 50),
    )
    middle_row = torch.zeros(50, dtype=torch.bool)
    middle_row[8:44] = True
    assert torch.equal(voted[0, 25], middle_row)
    assert torch.equal(voted[0, :, 25], middle_row)
    assert voted_boxes.tolist() == [[8.0, 8.0, 44.0, 44.0]]
    pasted, _ = _do_paste_mask(torch.ones(1, 1, 2, 2), boxes, 50, 50, skip_empty=False)
    assert torch.equal(voted[0], pasted[0] >= 0.4)


def test_several_kept_instances_and_shared_voters():
    boxes = torch.tensor([BOX_A, BOX_B, BOX_FAR, [0.0, 0.0, 16.0, 16.0]])
    classes = torch.tensor([0, 0, 0, 5])
    scores = torch.tensor([0.75, 0.25, 0.75, 0.5])
    masks = _ones(4)
    # Kept A (voters A, B), kept FAR (voters FAR, B: IoU(B, FAR) = 8*16 / 384 = 0.33 < 0.5,
    # so FAR alone), kept class-5 box alone.
    voted, voted_boxes = mask_voting(
        boxes, masks, scores, classes, torch.tensor([2, 0, 3]), IMAGE
    )
    assert torch.equal(voted[0], _rect(20, 8, 36, 24))
    assert torch.equal(voted[1], _rect(8, 8, 24, 24))
    assert torch.equal(voted[2], _rect(0, 0, 16, 16))
    assert voted_boxes.tolist() == [[20, 8, 36, 24], [8, 8, 24, 24], [0, 0, 16, 16]]


def test_empty_voted_mask_falls_back_to_kept_box():
    boxes = torch.tensor([[8.5, 8.25, 23.5, 23.75], BOX_B])
    masks = torch.stack([torch.full((SIDE, SIDE), 0.1), torch.full((SIDE, SIDE), 0.3)])
    voted, voted_boxes = mask_voting(
        boxes, masks, torch.tensor([0.9, 0.9]), torch.tensor([0, 0]), torch.tensor([0]), IMAGE
    )
    assert not voted.any()
    assert torch.equal(voted_boxes, boxes[:1])


def test_tight_box_matches_bitmasks():
    torch.manual_seed(1)
    boxes = torch.tensor([[5.3, 7.1, 30.2, 28.7], [6.0, 6.5, 29.0, 31.0], [4.2, 9.9, 27.5, 27.0]])
    masks = torch.rand(3, 14, 14)
    voted, voted_boxes = mask_voting(
        boxes, masks, torch.rand(3), torch.zeros(3, dtype=torch.long), torch.tensor([0, 2]), IMAGE
    )
    assert voted.any(dim=(1, 2)).all()
    assert torch.equal(voted_boxes, BitMasks(voted).get_bounding_boxes().tensor)


def test_masks_reaching_outside_the_image():
    # Voters sticking out of the image on every side, and a voting frame that must be
    # shifted back inside the image.
    boxes = torch.tensor(
        [[-6.3, -4.1, 20.2, 18.7], [-3.0, -5.5, 22.0, 16.0], [30.5, 20.2, 55.0, 47.0],
         [28.0, 22.0, 52.5, 44.0]]
    )
    masks = torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([0.9, 0.6, 0.8, 0.7])
    classes = torch.tensor([1, 1, 1, 1])
    keep = torch.tensor([0, 2])
    voted, voted_boxes = mask_voting(boxes, masks, scores, classes, keep, IMAGE)
    soft = reference_mask_voting(boxes, masks, scores, classes, keep, IMAGE)
    assert torch.equal(voted, soft >= 0.4)
    assert torch.equal(voted_boxes, BitMasks(voted).get_bounding_boxes().tensor)


def test_empty_inputs():
    image = (30, 20)
    voted, voted_boxes = mask_voting(
        torch.zeros(0, 4),
        torch.zeros(0, 28, 28),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        image,
    )
    assert voted.shape == (0, 30, 20) and voted.dtype == torch.bool
    assert voted_boxes.shape == (0, 4)
    voted, voted_boxes = mask_voting(
        torch.tensor([BOX_A]),
        _ones(1),
        torch.ones(1),
        torch.zeros(1, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        image,
    )
    assert voted.shape == (0, 30, 20) and voted_boxes.shape == (0, 4)


def test_degenerate_and_non_finite_boxes_do_not_vote():
    boxes = torch.tensor(
        [BOX_A, [10.0, 10.0, 10.0, 20.0], [float("nan"), 8.0, 24.0, 24.0], [8.0, 8.0, 24.0, 8.0]]
    )
    scores = torch.tensor([0.5, 0.9, 0.9, 0.9])
    classes = torch.zeros(4, dtype=torch.long)
    voted, voted_boxes = mask_voting(boxes, _ones(4), scores, classes, torch.tensor([0, 1]), IMAGE)
    assert torch.equal(voted[0], _rect(8, 8, 24, 24))
    assert not voted[1].any()
    assert torch.equal(voted_boxes[1], boxes[1])


def test_zero_scores_give_empty_masks_not_nan():
    voted, voted_boxes = mask_voting(
        torch.tensor([BOX_A]), _ones(1), torch.zeros(1), torch.zeros(1, dtype=torch.long),
        torch.tensor([0]), IMAGE,
    )
    assert not voted.any()
    assert voted_boxes.tolist() == [BOX_A]


def test_rejects_non_positive_mask_threshold():
    with pytest.raises(ValueError):
        mask_voting(
            torch.tensor([BOX_A]), _ones(1), torch.ones(1), torch.zeros(1, dtype=torch.long),
            torch.tensor([0]), IMAGE, mask_threshold=0.0,
        )


def _random_candidates(num_objects, per_object, image_size, mask_side, seed):
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = image_size
    centres = torch.rand(num_objects, 2, generator=g) * torch.tensor([img_w, img_h])
    sizes = torch.rand(num_objects, 2, generator=g) * 0.4 * min(image_size) + 4
    base = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    num = num_objects * per_object
    boxes = base.repeat_interleave(per_object, 0) + torch.randn(num, 4, generator=g) * 0.06 * (
        sizes.repeat_interleave(per_object, 0).repeat(1, 2)
    )
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    classes = torch.randint(0, 3, (num_objects,), generator=g).repeat_interleave(per_object)
    scores = torch.rand(num, generator=g) + 0.05
    masks = torch.rand(num, mask_side, mask_side, generator=g)
    return boxes, masks, scores, classes


@pytest.mark.parametrize("chunk_size", [1 << 23, 3000])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_on_random_candidates(seed, chunk_size):
    image = (50, 70)
    boxes, masks, scores, classes = _random_candidates(8, 5, image, 7, seed)
    keep = batched_nms(boxes, scores, classes, 0.3)[:10]
    voted, voted_boxes = mask_voting(
        boxes, masks, scores, classes, keep, image, chunk_size=chunk_size
    )
    soft = reference_mask_voting(boxes, masks, scores, classes, keep, image)
    # Summation order differs from the reference: pixels within 1e-5 of the threshold
    # may go either way.
    decided = (soft - 0.4).abs() > 1e-5
    assert torch.equal(voted[decided], soft[decided] >= 0.4)
    assert (~decided).sum() <= 2
    assert voted.any(dim=(1, 2)).all()
    assert torch.equal(voted_boxes, BitMasks(voted).get_bounding_boxes().tensor)


def test_chunking_does_not_change_the_result():
    image = (60, 80)
    boxes, masks, scores, classes = _random_candidates(12, 6, image, 9, seed=3)
    keep = batched_nms(boxes, scores, classes, 0.3)
    # The smallest budgets force one kept instance per chunk and one voter per step.
    results = [
        mask_voting(boxes, masks, scores, classes, keep, image, chunk_size=c)
        for c in (1 << 24, 5000, 1)
    ]
    for voted, voted_boxes in results[1:]:
        assert torch.equal(voted, results[0][0])
        assert torch.equal(voted_boxes, results[0][1])


def test_single_voter_matches_d2_paste():
    # One candidate voting alone: the result is D2's pasted mask binarised at 0.4.
    g = torch.Generator().manual_seed(4)
    boxes = torch.tensor(
        [[3.7, 5.2, 40.1, 33.3], [20.4, 1.1, 47.9, 38.6], [-5.0, 10.5, 12.2, 45.0]]
    )
    masks = torch.rand(3, 28, 28, generator=g)
    keep = torch.arange(3)
    voted, _ = mask_voting(boxes, masks, torch.ones(3), keep, keep, IMAGE)
    pasted, _ = _do_paste_mask(masks[:, None], boxes, IMAGE[0], IMAGE[1], skip_empty=False)
    decided = (pasted - 0.4).abs() > 1e-5
    assert torch.equal(voted[decided], pasted[decided] >= 0.4)


def test_600_candidates_full_image_prints_timing():
    image = (800, 1333)
    boxes, masks, scores, classes = _random_candidates(100, 6, image, 21, seed=0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image[0])
    keep = batched_nms(boxes, scores, classes, 0.3)[:100]
    start = time.perf_counter()
    voted, voted_boxes = mask_voting(boxes, masks, scores, classes, keep, image)
    elapsed = time.perf_counter() - start
    print(f"mask_voting: 600 candidates, {len(keep)} kept, 1333x800: {elapsed:.3f} s")
    # No bound on the time: on a shared machine even a generous one flakes.
    assert voted.shape == (len(keep),) + image
    assert voted.any(dim=(1, 2)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    image = (50, 70)
    boxes, masks, scores, classes = _random_candidates(8, 5, image, 7, seed=0)
    keep = batched_nms(boxes, scores, classes, 0.3)[:10]
    voted, voted_boxes = mask_voting(boxes, masks, scores, classes, keep, image)
    voted_cuda, voted_boxes_cuda = mask_voting(
        boxes.cuda(), masks.cuda(), scores.cuda(), classes.cuda(), keep.cuda(), image
    )
    assert voted_cuda.device.type == "cuda"
    assert (voted_cuda.cpu() != voted).sum() <= 2
    assert torch.allclose(voted_boxes_cuda.cpu(), voted_boxes, atol=1)
