import pytest
import torch

from detectron2.structures import BitMasks, PolygonMasks
from mnc_d2.modeling.mask_ops import binary_mask_iou_with_targets, mask_loss, mask_pooled_features, mask_targets


def test_mask_targets_binarise_at_threshold():
    # A GT mask covering 9 of 20 columns; a 1x1 target over columns 4.5..14.5 is 45 % covered:
    # foreground at MNC's 0.4, background at D2's 0.5.
    mask = torch.zeros((1, 20, 20), dtype=torch.bool)
    mask[0, :, :9] = True
    box = torch.tensor([[4.5, 0.0, 14.5, 20.0]])
    assert mask_targets(BitMasks(mask), box, 1, threshold=0.4).item() == 1.0
    assert mask_targets(BitMasks(mask), box, 1, threshold=0.5).item() == 0.0
    # Cropped to the RoI and resized: the left 9 of 20 columns -> left cells of a 4x4 target.
    full = mask_targets(BitMasks(mask), torch.tensor([[0.0, 0.0, 20.0, 20.0]]), 4, threshold=0.4)
    assert full.shape == (1, 4, 4)
    assert full[0, :, :2].eq(1).all() and full[0, :, 2:].eq(0).all()


def test_mask_targets_polygons_and_empty():
    poly = PolygonMasks([[[0, 0, 10, 0, 10, 10, 0, 10]]])
    t = mask_targets(poly, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), 4, threshold=0.4)
    assert t.shape == (1, 4, 4) and t.eq(1).all()
    empty = mask_targets(BitMasks(torch.zeros((0, 8, 8), dtype=torch.bool)), torch.zeros((0, 4)), 4, 0.4)
    assert empty.shape == (0, 4, 4)


def test_mask_loss_matches_bce_and_empty_has_graph():
    logits = torch.randn(3, 1, 4, 4, requires_grad=True)
    targets = (torch.rand(3, 4, 4) > 0.5).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets)
    assert torch.allclose(mask_loss(logits, targets), expected)
    empty = mask_loss(logits[:0], torch.zeros(0, 4, 4))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


def test_mask_pooled_features_resizes_soft_mask_and_passes_gradient():
    feats = torch.ones(2, 3, 14, 14)
    probs = torch.full((2, 1, 21, 21), 0.25, requires_grad=True)
    out = mask_pooled_features(feats, probs)
    assert out.shape == (2, 3, 14, 14)
    assert torch.allclose(out, torch.full_like(out, 0.25))  # soft, not binarised
    out.sum().backward()
    assert probs.grad.abs().sum() > 0


def test_binary_mask_iou():
    probs = torch.zeros(2, 1, 4, 4)
    probs[0, 0, :2] = 0.9  # top half predicted
    targets = torch.zeros(2, 4, 4)
    targets[0, :, :] = 1  # whole RoI
    iou = binary_mask_iou_with_targets(probs, targets, 0.4)
    assert torch.allclose(iou, torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize("k,side", [(2, 14), (3, 9), (1, 7)])
def test_max_pool_square_equals_max_pool2d(k, side):
    from mnc_d2.modeling.mask_ops import max_pool_square

    x = torch.randn(5, 3, side, side, dtype=torch.float64, requires_grad=True)
    out = max_pool_square(x, k)
    expected = torch.nn.functional.max_pool2d(x, k) if k > 1 else x
    assert out.shape == (5, 3, side // k, side // k)
    assert torch.equal(out, expected)
    # the gradient reaches exactly the maximum of each window (no ties in random data)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    assert torch.equal(grad, expected_grad)


def test_max_pool_square_rejects_indivisible_side():
    from mnc_d2.modeling.mask_ops import max_pool_square

    with pytest.raises(ValueError, match="not divisible by 2"):
        max_pool_square(torch.zeros(1, 1, 7, 7), 2)
