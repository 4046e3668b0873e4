"""ParallelROIPooler: D2's ROIPooler with the RoIs split across threads on CPU. Outputs must be
bit-identical to D2's (gradients equal up to summation order), in RoI order, on FPN and single-level features, with and without
gradient mode, and for any thread count."""
import pytest
import torch

from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from mnc_d2.modeling.poolers import ParallelROIPooler

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def random_boxes(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6]) + 4  # sizes span the FPN levels
    return Boxes(torch.cat([xy, (xy + wh).clamp(max=torch.tensor([w - 1.0, h - 1.0]))], dim=1))


def features(scales, h=256, w=320, batch=2, channels=8, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, int(h * s), int(w * s), generator=g).requires_grad_(requires_grad)
            for s in scales]


def poolers(scales, sampling_ratio=2, **kwargs):
    args = dict(output_size=7, scales=scales, sampling_ratio=sampling_ratio, pooler_type="ROIAlignV2")
    return ROIPooler(**args), ParallelROIPooler(**args, **kwargs)


@pytest.mark.parametrize("scales", [SCALES, (1 / 16,)], ids=["fpn", "single_level"])
@pytest.mark.parametrize("threads", [2, 3])
def test_same_output_as_d2(scales, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = features(scales)
    boxes = [random_boxes(150, 256, 320, seed=1), random_boxes(90, 256, 320, seed=2)]
    reference, parallel = poolers(scales, min_rois_per_thread=8)
    with torch.no_grad():
        expected = reference(x, boxes)
        out = parallel(x, boxes)
    assert out.shape == (240, 8, 7, 7)
    assert torch.equal(out, expected)


def test_same_gradient_as_d2(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    boxes = [random_boxes(120, 256, 320, seed=3), random_boxes(40, 256, 320, seed=4)]
    reference, parallel = poolers(SCALES, min_rois_per_thread=8, parallel_backward_graph=True)
    grads = []
    for pooler in (reference, parallel):
        x = features(SCALES, requires_grad=True)
        out = pooler(x, boxes)
        assert out.requires_grad  # grad mode reaches the worker threads
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads.append(torch.autograd.grad((out * weights).sum(), x, allow_unused=True))
    x = features(SCALES)
    for level, (expected, got) in enumerate(zip(*grads)):  # None: a level without RoIs
        expected = torch.zeros_like(x[level]) if expected is None else expected
        got = torch.zeros_like(x[level]) if got is None else got
        # equal up to the order in which RoI gradients are summed into the feature map
        assert torch.allclose(expected, got, rtol=1e-5, atol=1e-6)
    assert sum(g is not None and g.abs().sum() > 0 for g in grads[1]) >= 2  # several levels are used


def test_training_uses_d2_path_by_default(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    _, parallel = poolers(SCALES, min_rois_per_thread=8)
    calls = []
    monkeypatch.setattr(ROIPooler, "forward", lambda self, x, boxes: calls.append(1) or x[0].new_zeros(0))
    parallel(features(SCALES, requires_grad=True), [random_boxes(64, 256, 320, seed=5)] * 2)
    assert calls == [1]
    with torch.no_grad():
        parallel(features(SCALES, requires_grad=True), [random_boxes(64, 256, 320, seed=5)] * 2)
    assert calls == [1]  # inference: the threaded path


def test_no_grad_mode_reaches_the_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = features(SCALES, requires_grad=True)
    _, parallel = poolers(SCALES, min_rois_per_thread=8)
    with torch.no_grad():
        out = parallel(x, [random_boxes(64, 256, 320, seed=5), random_boxes(64, 256, 320, seed=6)])
    assert not out.requires_grad


@pytest.mark.parametrize("counts", [(0, 0), (3, 0), (0, 40)])
def test_few_or_no_boxes(counts, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = features(SCALES)
    boxes = [random_boxes(n, 256, 320, seed=i) for i, n in enumerate(counts)]
    reference, parallel = poolers(SCALES, min_rois_per_thread=8)
    assert torch.equal(parallel(x, boxes), reference(x, boxes))
    assert parallel(x, boxes).shape == (sum(counts), 8, 7, 7)
