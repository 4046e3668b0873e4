"""Stages 2 and 3 of MNCROIHeads on hand-built features: shapes, losses, empty cases, gradient flow."""
import pytest
import torch

from conftest import make_targets, small_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

IMAGE_SIZE = (200, 250)
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


def build_heads(*opts):
    cfg = small_cfg(*opts)
    shapes = {k: ShapeSpec(channels=cfg.MODEL.FPN.OUT_CHANNELS, stride=s) for k, s in STRIDES.items()}
    torch.manual_seed(0)
    return build_roi_heads(cfg, shapes), cfg


def features(channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_SIZE
    return {k: torch.randn((2, channels, h // s, w // s), generator=g) for k, s in STRIDES.items()}


def proposals(num=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        xy = torch.rand((num, 2), generator=g) * 150
        wh = torch.rand((num, 2), generator=g) * 80 + 16
        p = Instances(IMAGE_SIZE)
        p.proposal_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        p.objectness_logits = torch.randn(num, generator=g)
        out.append(p)
    return out


def images():
    return ImageList(torch.zeros(2, 3, *IMAGE_SIZE), [IMAGE_SIZE, IMAGE_SIZE])


def train_losses(heads, cfg, targets):
    heads.train()
    with EventStorage():
        _, losses = heads(images(), features(cfg.MODEL.FPN.OUT_CHANNELS), proposals(), targets)
    return losses


def test_training_losses_are_finite_and_named():
    heads, cfg = build_heads()
    losses = train_losses(heads, cfg, [make_targets(IMAGE_SIZE), make_targets(IMAGE_SIZE)])
    assert set(losses) == {"loss_mask", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0  # foreground RoIs exist (GT boxes are appended)
    sum(losses.values()).backward()


def test_sampling_follows_reference_values_by_default():
    heads, cfg = build_heads()
    assert heads.batch_size_per_image == 64 and heads.positive_fraction == 0.3
    heads.train()
    with EventStorage():
        rois = heads.label_and_sample_proposals(proposals(num=200), [make_targets(IMAGE_SIZE)] * 2)
    for r in rois:
        assert len(r) <= 64
        assert (r.gt_classes < cfg.MODEL.ROI_HEADS.NUM_CLASSES).sum() <= int(64 * 0.3)


@pytest.mark.parametrize("with_gt", [(False, False), (True, False)])
def test_empty_and_half_empty_batches_train(with_gt):
    heads, cfg = build_heads()
    empty = make_targets(IMAGE_SIZE, boxes=(), classes=())
    targets = [make_targets(IMAGE_SIZE) if g else empty for g in with_gt]
    losses = train_losses(heads, cfg, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()  # must not raise even with no foreground at all
    if not any(with_gt):
        assert losses["loss_mask"].item() == 0.0


def test_stage3_gradient_reaches_mask_head_through_the_soft_mask():
    heads, cfg = build_heads()
    losses = train_losses(heads, cfg, [make_targets(IMAGE_SIZE)] * 2)
    losses["loss_cls"].backward()  # classification loss ALONE
    grads = [p.grad for p in heads.mask_head.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_without_segment_pathway_the_mask_head_gets_no_classification_gradient():
    """The same check must fail when the segment pathway is removed (the test above can fail)."""
    heads, cfg = build_heads("MODEL.MNC.SEGMENT_PATHWAY", False)
    assert heads.segment_pathway is None
    losses = train_losses(heads, cfg, [make_targets(IMAGE_SIZE)] * 2)
    losses["loss_cls"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in heads.mask_head.parameters())


def test_predictor_sees_both_pathways():
    heads, cfg = build_heads()
    fc_dim = cfg.MODEL.ROI_BOX_HEAD.FC_DIM
    assert heads.box_predictor.cls_score.in_features == 2 * fc_dim
    assert heads.segment_pathway is not heads.box_pathway
    assert heads.segment_pathway.state_dict().keys() == heads.box_pathway.state_dict().keys()


def test_inference_returns_candidates_with_masks_in_their_boxes():
    heads, cfg = build_heads()
    heads.eval()
    with torch.no_grad():
        results, _ = heads(images(), features(cfg.MODEL.FPN.OUT_CHANNELS), proposals())
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    m = cfg.MODEL.MNC.MASK_HEAD.MASK_SIZE
    for r, p in zip(results, proposals()):
        c = len(r)
        assert c > 0
        assert r.pred_masks.shape == (c, 1, m, m)
        assert ((r.pred_masks >= 0) & (r.pred_masks <= 1)).all()
        assert r.pred_classes.max() < k
        kept = (r.kept_rank >= 0).sum().item()
        assert 0 < kept <= cfg.TEST.DETECTIONS_PER_IMAGE
        assert sorted(r.kept_rank[r.kept_rank >= 0].tolist()) == list(range(kept))
        # each candidate's mask box is one of its image's proposals (stage 2 predicts masks in proposals)
        props = p.proposal_boxes.tensor  # (P, 4)
        assert (r.mask_boxes.tensor[:, None, :] == props[None]).all(-1).any(-1).all()


def test_inference_with_no_proposals():
    heads, cfg = build_heads()
    heads.eval()
    empty = Instances(IMAGE_SIZE)
    empty.proposal_boxes = Boxes(torch.zeros((0, 4)))
    empty.objectness_logits = torch.zeros(0)
    with torch.no_grad():
        results, _ = heads(images(), features(cfg.MODEL.FPN.OUT_CHANNELS), [empty, empty])
    assert all(len(r) == 0 for r in results)


def test_non_finite_features_give_no_detections_not_a_crash():
    heads, cfg = build_heads()
    heads.eval()
    feats = {k: torch.full_like(v, float("nan")) for k, v in features(cfg.MODEL.FPN.OUT_CHANNELS).items()}
    with torch.no_grad():
        results, _ = heads(images(), feats, proposals())
    assert all((r.kept_rank >= 0).sum() == 0 for r in results)


def test_d2_conv_mask_head_is_built_class_agnostic():
    heads, cfg = build_heads("MODEL.MNC.MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
                             "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", False)
    assert heads.mask_head.predictor.out_channels == 1
    losses = train_losses(heads, cfg, [make_targets(IMAGE_SIZE)] * 2)
    assert torch.isfinite(losses["loss_mask"])


def test_roi_heads_refuse_another_meta_architecture():
    cfg = small_cfg("MODEL.META_ARCHITECTURE", "GeneralizedRCNN")
    shapes = {k: ShapeSpec(channels=32, stride=s) for k, s in STRIDES.items()}
    with pytest.raises(ValueError, match="META_ARCHITECTURE"):
        build_roi_heads(cfg, shapes)
