import torch

from mnc_d2.modeling.sampling import sample_mnc_rois


def _sample(max_ious, **kw):
    args = dict(batch_size=64, positive_fraction=0.3, fg_iou=0.5, bg_iou_lo=0.1, bg_hard_fraction=0.85)
    args.update(kw)
    return sample_mnc_rois(max_ious, **args)


def test_reference_split_when_everything_is_plentiful():
    torch.manual_seed(0)
    ious = torch.cat([torch.full((100,), 0.7), torch.full((100,), 0.3), torch.full((100,), 0.05)])
    fg, bg = _sample(ious)
    assert len(fg) == int(64 * 0.3) == 19
    assert len(fg) + len(bg) == 64
    assert (ious[fg] >= 0.5).all() and (ious[bg] < 0.5).all()
    hard = ((ious[bg] >= 0.1) & (ious[bg] < 0.5)).sum().item()
    assert hard == round(45 * 0.85)  # 85% of the background from [0.1, 0.5)
    assert len(set(torch.cat([fg, bg]).tolist())) == 64  # no duplicates


def test_background_tops_up_from_the_other_range():
    ious = torch.cat([torch.full((3,), 0.9), torch.full((2,), 0.05), torch.full((200,), 0.2)])
    fg, bg = _sample(ious)
    assert len(fg) == 3
    assert len(bg) == 61  # easy range short (2): hard range fills the rest
    assert ((ious[bg] < 0.1).sum()) == 2


def test_no_foreground_and_no_proposals():
    fg, bg = _sample(torch.zeros(10))
    assert len(fg) == 0 and len(bg) == 10
    fg, bg = _sample(torch.zeros(0))
    assert len(fg) == 0 and len(bg) == 0

