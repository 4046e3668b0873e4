import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torch.nn import functional as F
from torchvision.ops import roi_align

from mnc_d2.modeling.roi_warp import ROIWarper, roi_warp


def _random_boxes(num, image_size, min_size, max_size, generator, margin=0.0, num_images=1):
    """(R, 5) pooler-format boxes with non-integer corners; with margin > 0 they stay at
    least `margin` pixels inside the image."""
    img_h, img_w = image_size
    sizes = min_size + torch.rand(num, 2, generator=generator, dtype=torch.float64) * (
        max_size - min_size
    )
    sizes = torch.minimum(sizes, torch.tensor([img_w, img_h], dtype=torch.float64) - 2 * margin)
    room = torch.tensor([img_w, img_h], dtype=torch.float64) - 2 * margin - sizes
    starts = margin + torch.rand(num, 2, generator=generator, dtype=torch.float64) * room
    batch = torch.randint(0, num_images, (num, 1), generator=generator).double()
    return torch.cat([batch, starts, starts + sizes], dim=1)


def _smooth_features(num_images, channels, height, width, seed, dtype=torch.float64):
    """A smooth random map: blurred noise through a random 3x3 conv (a real conv output)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(num_images, 3, height, width, generator=g, dtype=dtype)
    blur = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=dtype)
    blur = (blur[:, None] * blur[None, :]) / 256
    image = F.conv2d(image, blur.expand(3, 1, 5, 5), padding=2, groups=3)
    image = F.conv2d(image, blur.expand(3, 1, 5, 5), padding=2, groups=3)
    weight = torch.randn(channels, 3, 3, 3, generator=g, dtype=dtype)
    return F.conv2d(image, weight, padding=1)


@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("output_size", [7, (5, 3)])
def test_matches_roi_align_inside_the_map(sampling_ratio, output_size):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 20, 24, generator=g)
    scale = 0.25
    boxes = _random_boxes(30, (80, 96), 2, 60, g, margin=3, num_images=2).float()
    expected = roi_align(features, boxes, output_size, scale, sampling_ratio, aligned=True)
    warped = roi_warp(features, boxes, output_size, scale, sampling_ratio)
    assert warped.shape == expected.shape
    assert torch.allclose(warped, expected, atol=1e-5)


def test_matches_roi_align_at_and_beyond_the_border():
    # The border rule of RoIAlign is reproduced: zero beyond one pixel outside the map,
    # clamped within it. Boxes straddling and leaving the map, and sub-pixel boxes.
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 12, 15, generator=g, dtype=torch.float64)
    scale = 0.5
    boxes = _random_boxes(40, (24, 30), 0.3, 40, g, num_images=2)
    boxes[:, 1:] += torch.randn(40, 4, generator=g, dtype=torch.float64) * 6
    boxes = torch.cat([boxes, torch.tensor([[1.0, -30.0, -20.0, -5.0, -2.0]], dtype=torch.float64)])
    for sampling_ratio in (1, 2, 4):
        expected = roi_align(features, boxes, (4, 6), scale, sampling_ratio, aligned=True)
        warped = roi_warp(features, boxes, (4, 6), scale, sampling_ratio)
        assert torch.allclose(warped, expected, atol=1e-10)
    assert torch.equal(warped[-1], torch.zeros_like(warped[-1]))  # fully outside


def test_float32_boxes_with_float64_features():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(1, 2, 10, 10, generator=g, dtype=torch.float64)
    boxes = _random_boxes(5, (10, 10), 1, 8, g, margin=0.5)
    warped = roi_warp(features, boxes.float(), 3, 1.0, 2)
    assert warped.dtype == torch.float64
    expected = roi_align(features, boxes.float().double(), 3, 1.0, 2, aligned=True)
    assert torch.allclose(warped, expected, atol=1e-10)


@pytest.mark.parametrize("sampling_ratio", [0, -1, 1.5])
def test_rejects_non_positive_sampling_ratio(sampling_ratio):
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 1.0, sampling_ratio)
    with pytest.raises(ValueError, match="sampling_ratio"):
        ROIWarper(2, [1.0], sampling_ratio)


def _fpn_features(num_images, channels, image_size, strides, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(num_images, channels, image_size[0] // s, image_size[1] // s, generator=g)
        for s in strides
    ]


def test_roi_warper_matches_roi_pooler_on_fpn_levels():
    image_size = (256, 320)
    strides = [4, 8, 16, 32]
    scales = [1.0 / s for s in strides]
    features = _fpn_features(2, 8, image_size, strides, seed=3)
    g = torch.Generator().manual_seed(3)
    # Sizes from 10 to 240 px cover all four levels; 16 px margin keeps every sample
    # inside even the coarsest map.
    box_lists = [
        Boxes(_random_boxes(n, image_size, 10, 240, g, margin=16)[:, 1:].float()) for n in (25, 17)
    ]
    # canonical 56 px at level 4: sizes 10..240 px fall on levels 2..5.
    pooler = ROIPooler(7, scales, 2, "ROIAlignV2", canonical_box_size=56, canonical_level=4)
    warper = ROIWarper(7, scales, sampling_ratio=2, canonical_box_size=56, canonical_level=4)
    expected = pooler(features, box_lists)
    warped = warper(features, box_lists)
    assert warped.shape == expected.shape == (42, 8, 7, 7)
    assert torch.allclose(warped, expected, atol=1e-5)

    from detectron2.modeling.poolers import assign_boxes_to_levels

    levels = assign_boxes_to_levels(box_lists, 2, 5, 56, 4)
    assert len(levels.unique()) == 4  # the test covers every level


def test_roi_warper_single_level_matches_roi_pooler():
    features = _fpn_features(2, 5, (96, 128), [16], seed=4)
    g = torch.Generator().manual_seed(4)
    box_lists = [Boxes(_random_boxes(n, (96, 128), 4, 90, g)[:, 1:].float()) for n in (6, 0)]
    pooler = ROIPooler((14, 10), [1 / 16], sampling_ratio=3, pooler_type="ROIAlignV2")
    warper = ROIWarper((14, 10), [1 / 16], sampling_ratio=3)
    assert torch.allclose(warper(features, box_lists), pooler(features, box_lists), atol=1e-5)


def test_roi_warper_empty_inputs():
    features = _fpn_features(2, 6, (64, 64), [4, 8], seed=5)
    for f in features:
        f.requires_grad_(True)
    warper = ROIWarper(5, [0.25, 0.125], sampling_ratio=2)
    out = warper(features, [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))])
    assert out.shape == (0, 6, 5, 5)
    out.sum().backward()  # an empty batch still backprops
    assert features[0].grad is not None and not features[0].grad.any()

    out = warper([f[:0] for f in features], [])
    assert out.shape == (0, 6, 5, 5)

    boxes = torch.zeros(0, 5, requires_grad=True)
    out = roi_warp(features[0], boxes, (3, 4), 0.25, 2)
    assert out.shape == (0, 6, 3, 4)
    out.sum().backward()
    assert boxes.grad is not None and boxes.grad.shape == (0, 5)


def test_gradcheck_features_and_box_coordinates():
    g = torch.Generator().manual_seed(6)
    features = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    # Random non-integer corners; samples on integer pixel coordinates (where bilinear
    # interpolation has a kink) have probability 0. Some boxes straddle the border.
    boxes = _random_boxes(4, (10, 12), 2.5, 9, g, num_images=2)
    boxes[0, 1:] += torch.tensor([-2.1, -1.3, -2.2, -1.2], dtype=torch.float64)
    batch_idx = boxes[:, :1]
    coords = boxes[:, 1:].clone().requires_grad_(True)

    def warp(feats, box_coords):
        return roi_warp(feats, torch.cat([batch_idx, box_coords], dim=1), (2, 3), 0.5, 2)

    assert torch.autograd.gradcheck(warp, (features, coords), eps=1e-6, atol=1e-5)


def test_gradcheck_through_roi_warper():
    image_size = (64, 64)
    features = [
        f.double().requires_grad_(True) for f in _fpn_features(1, 2, image_size, [4, 8], seed=7)
    ]
    g = torch.Generator().manual_seed(7)
    coords = _random_boxes(3, image_size, 8, 60, g, margin=4)[:, 1:].requires_grad_(True)
    warper = ROIWarper(3, [0.25, 0.125], sampling_ratio=1, canonical_box_size=32, canonical_level=3)

    def warp(f0, f1, box_coords):
        # Boxes() casts to float32, which would quantise gradcheck's perturbations:
        # put the float64 tensor in afterwards.
        boxes = Boxes(box_coords.detach())
        boxes.tensor = box_coords
        return warper([f0, f1], [boxes])

    assert torch.autograd.gradcheck(warp, (*features, coords), eps=1e-6, atol=1e-5)


def test_box_gradient_matches_central_differences_on_a_smooth_map():
    features = _smooth_features(1, 4, 40, 48, seed=8)  # (1, 4, 40, 48), stride 4
    g = torch.Generator().manual_seed(8)
    coords = torch.tensor(
        [[21.37, 30.81, 117.52, 101.26], [60.13, 12.71, 170.94, 150.33]], dtype=torch.float64
    )
    coords.requires_grad_(True)
    weights = torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64)

    def loss(box_coords):
        boxes = torch.cat([torch.zeros(2, 1, dtype=torch.float64), box_coords], dim=1)
        return (roi_warp(features, boxes, 7, 0.25, 2) * weights).sum()

    loss(coords).backward()
    analytic = coords.grad  # (2, 4): d loss / d (x0, y0, x1, y1)
    numeric = torch.zeros_like(analytic)
    eps = 1e-4
    for r in range(2):
        for c in range(4):
            delta = torch.zeros_like(coords)
            delta[r, c] = eps
            with torch.no_grad():
                numeric[r, c] = (loss(coords + delta) - loss(coords - delta)) / (2 * eps)
    assert (analytic.abs() > 1e-3).all()  # every corner gets a real gradient
    assert torch.allclose(analytic, numeric, rtol=1e-3, atol=1e-6)


def test_gradient_reaches_boxes_of_every_level_and_level_choice_is_detached():
    image_size = (128, 128)
    strides = [4, 8]
    features = _fpn_features(2, 3, image_size, strides, seed=9)
    g = torch.Generator().manual_seed(9)
    tensors = [
        _random_boxes(n, image_size, 8, 120, g, margin=2)[:, 1:].float().requires_grad_(True)
        for n in (5, 4)
    ]
    warper = ROIWarper(4, [1 / s for s in strides], sampling_ratio=2, canonical_box_size=56,
                       canonical_level=3)
    out = warper(features, [Boxes(t) for t in tensors])
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    for t in tensors:
        assert t.grad is not None
        assert (t.grad.abs().sum(dim=1) > 0).all()


def test_large_batch_matches_roi_align_without_python_loop_per_roi():
    # 512 RoIs over two images in one call each: a smoke test that it stays fast.
    g = torch.Generator().manual_seed(10)
    features = torch.randn(2, 16, 50, 68, generator=g)
    boxes = _random_boxes(512, (800, 1088), 8, 400, g, margin=10, num_images=2).float()
    expected = roi_align(features, boxes, 7, 1 / 16, 2, aligned=True)
    # Coordinates up to 1000 px: both float32 results are ~1e-5 off the float64 value.
    assert torch.allclose(roi_warp(features, boxes, 7, 1 / 16, 2), expected, atol=5e-5)
