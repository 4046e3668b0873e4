"""GPU checks (``pytest -m gpu``; they skip without CUDA, so CI on CPU skips them all): the cascade's
pieces on CUDA tensors, and AMP training of MNC. ``benchmarks/gpu_check.sh`` runs them first on a GPU."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torchvision.ops import roi_align

from mnc_d2.modeling.mask_voting import mask_voting
from mnc_d2.modeling.roi_warp import roi_warp

from conftest import make_batch, small_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_roi_warp_matches_roi_align_on_cuda():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 40, 50, generator=g).cuda()  # (N, C, H, W)
    corners = torch.rand(30, 2, generator=g) * torch.tensor([150.0, 120.0])
    sizes = 20 + torch.rand(30, 2, generator=g) * 40
    boxes = torch.cat([torch.randint(0, 2, (30, 1), generator=g).float(), corners, corners + sizes], 1).cuda()
    warped = roi_warp(features, boxes, 7, 0.25, 2)  # (R, C, 7, 7)
    expected = roi_align(features, boxes, 7, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    assert warped.device.type == "cuda"
    torch.testing.assert_close(warped, expected, atol=1e-4, rtol=1e-4)


def test_mask_voting_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [12.0, 8.0, 62.0, 66.0], [100.0, 40.0, 150.0, 90.0]])
    masks = torch.rand(3, 21, 21, generator=g)  # (R, M, M) soft masks
    scores, classes, keep = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 2]), torch.tensor([0, 2])
    voted, voted_boxes = mask_voting(boxes, masks, scores, classes, keep, (120, 160))
    voted_cuda, voted_boxes_cuda = mask_voting(boxes.cuda(), masks.cuda(), scores.cuda(), classes.cuda(),
                                               keep.cuda(), (120, 160))
    assert voted_cuda.device.type == "cuda"
    assert (voted_cuda.cpu() != voted).sum() <= 2  # float rounding at the 0.4 threshold only
    torch.testing.assert_close(voted_boxes_cuda.cpu(), voted_boxes, atol=1, rtol=0)


@pytest.mark.parametrize("stages", [3, 5])
def test_amp_training_steps_stay_finite(stages):
    cfg = small_cfg("MODEL.MNC.NUM_STAGES", stages, "MODEL.DEVICE", "cuda")
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    for step in range(3):
        with EventStorage(step), torch.autocast("cuda", dtype=torch.float16):
            losses = model(make_batch(seed=step))
        assert all(torch.isfinite(v).all() for v in losses.values()), {k: float(v) for k, v in losses.items()}
        optimizer.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
