"""The switches of "The cascade, rebuilt": segment IoU against the whole GT mask, the delta-space bound on
box gradients, masks on the final boxes, a final mask head, differentiable regression targets, the cheap
mask-head conv. Each test fails without its switch's code."""
import torch
from test_cascade import IMAGE_SIZE, _grad_norm, batch, train_losses

from conftest import make_targets, small_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from mnc_d2.modeling.box_gradients import clip_delta_gradient
from mnc_d2.modeling.mask_ops import mask_targets, segment_iou_with_whole_gt
from mnc_d2.modeling.mask_voting import mask_voting


# ------------------------------------------------------------------ segment labels
def test_segment_iou_counts_the_whole_gt_mask():
    gt = torch.zeros(1, 100, 100, dtype=torch.bool)
    gt[0, 20:60, 20:80] = True  # a 40 x 60 object
    half_roi = torch.tensor([[20.0, 20.0, 50.0, 60.0]])  # its left half
    whole_roi = torch.tensor([[20.0, 20.0, 80.0, 60.0]])
    for roi, expected in ((half_roi, 0.5), (whole_roi, 1.0)):
        target = mask_targets(BitMasks(gt), roi, 20, 0.4)  # the GT inside the RoI
        perfect = target[:, None]  # a perfect mask of what the RoI holds
        iou = segment_iou_with_whole_gt(perfect, target, Boxes(roi).area(), gt.flatten(1).sum(1).float(), 0.4)
        assert torch.allclose(iou, torch.tensor([expected]), atol=0.02), (roi, iou)


def test_segment_labels_of_a_perfect_half_mask_are_background():
    """The old rule (IoU with the GT inside the RoI) called a perfect half-mask a good segment (IoU 1)."""
    cfg = small_cfg("MODEL.MNC.SEGMENT_GATING", True, "MODEL.MNC.SEGMENT_CLASSIFIER.MASK_IOU", 0.7)
    heads = build_model(cfg).roi_heads
    targets = make_targets(IMAGE_SIZE, boxes=((20, 30, 120, 140),), classes=(2,))
    rois = Instances(IMAGE_SIZE, proposal_boxes=Boxes(torch.tensor([[20.0, 30.0, 70.0, 140.0], [20.0, 30.0, 120.0, 140.0]])))
    rois = heads._with_targets(rois, targets, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))
    mask_size = 14
    perfect = heads._mask_targets([rois], mask_size)[:, None]  # (2, 1, M, M)
    labels = heads._segment_labels(perfect, perfect[:, 0], [rois])
    assert labels.tolist() == [cfg.MODEL.ROI_HEADS.NUM_CLASSES, 2]


# ------------------------------------------------------------------ delta-space bound
def test_delta_clip_bounds_only_its_own_path():
    deltas = torch.tensor([[0.5, -2.0, 0.01, 0.0]], requires_grad=True)
    (clip_delta_gradient(deltas, 0.1, "t") * 10).sum().backward()  # box path: clipped
    assert torch.equal(deltas.grad, torch.tensor([[0.1, 0.1, 0.1, 0.1]]))
    deltas.grad = None
    (clip_delta_gradient(deltas, 0.1, "t") * 10 + deltas * 10).sum().backward()  # own loss: untouched
    assert torch.allclose(deltas.grad, torch.tensor([[10.1, 10.1, 10.1, 10.1]]))


def test_delta_clip_logs_the_clipped_share_and_bounds_the_rpn_gradient():
    for bound, binds in ((1e-12, True), (1e3, False)):
        cfg = small_cfg("MODEL.RPN.POST_NMS_TOPK_TRAIN", 100, "MODEL.MNC.NUM_STAGES", 5,
                        "MODEL.MNC.BOX_GRADIENTS.ENABLED", True, "MODEL.MNC.BOX_GRADIENTS.CLIP", 0.0,
                        "MODEL.MNC.BOX_GRADIENTS.DELTA_CLIP", bound)
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        with EventStorage() as storage:
            losses = model(batch())
            # mask losses reach the RPN's deltas (and stage 3's, through stage 4's boxes) only via box paths
            (losses["loss_mask"] + losses["loss_mask_stage4"]).backward()
            history = storage.histories()
            for name in ("rpn_delta", "stage3_delta"):
                fraction = history[f"box_gradients/{name}_clipped_fraction"].latest()
                assert (fraction > 0.9) if binds else fraction == 0, (name, bound, fraction)
        got = _grad_norm(model.proposal_generator.rpn_head.anchor_deltas.parameters())
        assert got > 0
        if binds:  # every delta's gradient is at most 1e-12 / 2 images: the conv's gradient is tiny
            assert got < 1e-6, got


# ------------------------------------------------------------------ differentiable targets
def test_differentiable_targets_same_loss_more_gradient_paths():
    base = ("MODEL.MNC.BOX_GRADIENTS.ENABLED", True, "MODEL.MNC.BOX_GRADIENTS.CLIP", 0.0)
    model_a, detached = train_losses(*base)
    model_b, live = train_losses(*base, "MODEL.MNC.BOX_GRADIENTS.DIFFERENTIABLE_TARGETS", True)
    assert torch.allclose(detached["loss_box_reg"], live["loss_box_reg"])
    detached["loss_box_reg"].backward()
    live["loss_box_reg"].backward()
    grad_a = _grad_norm(model_a.proposal_generator.rpn_head.anchor_deltas.parameters())
    grad_b = _grad_norm(model_b.proposal_generator.rpn_head.anchor_deltas.parameters())
    assert grad_a > 0 and grad_b > 0 and abs(grad_a - grad_b) > 1e-3 * grad_a


# ------------------------------------------------------------------ masks on the final boxes
def _raw_candidates(*opts):
    cfg = small_cfg("MODEL.MNC.TEST.MASK_VOTING", False, *opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.eval()
    image = [{"image": batch()[0]["image"]}]
    with torch.no_grad():
        return model, model.inference(image, do_postprocess=False)[0], model(image)[0]["instances"]


def test_masks_on_final_boxes_are_predicted_on_the_regressed_boxes():
    _, off, _ = _raw_candidates()
    model, on, final = _raw_candidates("MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", True)
    kept = on.kept_rank >= 0
    assert kept.any() and (~kept).any()
    assert torch.equal(on.mask_boxes.tensor[kept], on.pred_boxes.tensor[kept])
    assert not torch.equal(off.mask_boxes.tensor[kept], off.pred_boxes.tensor[kept])  # proposals before
    assert torch.equal(on.mask_boxes.tensor[~kept], off.mask_boxes.tensor[~kept])  # voters keep their frame
    heads = model.roi_heads  # the masks are the stage-2 head's on those boxes
    images = model.preprocess_image([{"image": batch()[0]["image"]}])
    with torch.no_grad():
        features = [model.backbone(images.tensor)[f] for f in heads.in_features]
        expected = heads._mask_logits(heads._roi_features(features, [on.pred_boxes[kept]])).sigmoid()
    assert torch.allclose(on.pred_masks[kept], expected, atol=1e-6)
    assert len(final) == kept.sum()


def test_final_mask_head_trains_and_predicts_its_own_mask_size():
    opts = ("MODEL.MNC.FINAL_MASK_HEAD.ENABLED", True, "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER", False,
            "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV", 2,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", True)
    model, losses = train_losses(*opts)
    assert model.roi_heads.final_mask_head.predictor.out_channels == 1
    assert torch.isfinite(losses["loss_mask_final"]) and losses["loss_mask_final"] > 0
    losses["loss_mask_final"].backward()
    assert _grad_norm(model.roi_heads.final_mask_head.parameters()) > 0
    assert _grad_norm(model.roi_heads.mask_head.parameters()) == 0  # its own loss, not stage 2's head
    for voting in (False, True):
        _, raw, final = _raw_candidates(*opts, "MODEL.MNC.TEST.MASK_VOTING", voting)
        side = 2 * model.roi_heads.roi_pooler.output_size[0]  # D2's head upsamples the RoI features 2x
        assert raw.pred_masks.shape[-2:] == (side, side) and side != model.roi_heads.mask_head.mask_size
        assert len(final) > 0


def test_refined_mask_loss_trains_the_output_head_on_the_regressed_boxes(monkeypatch):
    """loss_mask_refined: the output mask head (the final head if any, else stage 2's) on the foreground
    boxes as stage 3 regressed them, the frame masks_on_final_boxes predicts in."""
    from mnc_d2.modeling.roi_heads import MNCROIHeads

    seen = {}
    original = MNCROIHeads._refined_mask_loss

    def spy(self, features, out, rois, targets):
        refined = self._refined_boxes(out, [r.image_size for r in rois])
        seen["refined"] = [torch.cat([b.tensor.detach(), t.gt_boxes.tensor]) for b, t in zip(refined, targets)]
        pooled = []
        roi_features = self._roi_features
        self._roi_features = lambda f, boxes: pooled.append([b.tensor.clone() for b in boxes]) or roi_features(f, boxes)
        try:
            return original(self, features, out, rois, targets)
        finally:
            del self._roi_features
            seen["pooled"] = pooled[0]

    monkeypatch.setattr(MNCROIHeads, "_refined_mask_loss", spy)
    model, losses = train_losses()
    assert "loss_mask_refined" not in losses and not seen  # off by default
    for final_head in (False, True):
        opts = ("MODEL.MNC.REFINED_MASK_LOSS", True, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32)
        if final_head:
            opts += ("MODEL.MNC.FINAL_MASK_HEAD.ENABLED", True, "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER", False,
                     "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
                     "MODEL.ROI_MASK_HEAD.CONV_DIM", 8, "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", True)
        model, losses = train_losses(*opts)
        assert torch.isfinite(losses["loss_mask_refined"]) and losses["loss_mask_refined"] > 0
        for pooled, refined in zip(seen["pooled"], seen["refined"]):  # regressed boxes (and GT boxes, as stage 4)
            assert len(pooled) > 0
            assert ((pooled[:, None] - refined[None]).abs().amax(dim=2).min(dim=1).values < 1e-4).all()
        losses["loss_mask_refined"].backward()
        trained, untouched = model.roi_heads.mask_head, model.roi_heads.final_mask_head
        if final_head:
            trained, untouched = untouched, trained
        assert _grad_norm(trained.parameters()) > 0
        assert untouched is None or _grad_norm(untouched.parameters()) == 0
        assert _grad_norm(model.roi_heads.box_pathway.parameters()) == 0  # the boxes are detached


def test_final_mask_head_with_its_own_pooler():
    """FINAL_MASK_HEAD.OWN_POOLER: the cascade pools 7x7 for its RoIs, the final head 14x14 (-> 28x28
    masks), in training (loss_mask_final, loss_mask_refined) and at test time."""
    opts = ("MODEL.MNC.FINAL_MASK_HEAD.ENABLED", True, "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
            "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 8, "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", True,
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, "MODEL.MNC.PATHWAY_POOL", 1,
            "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER", True, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14, "MODEL.MNC.REFINED_MASK_LOSS", True)
    model, losses = train_losses(*opts)
    heads = model.roi_heads
    assert heads.roi_pooler.output_size == (7, 7) and heads.final_pooler.output_size == (14, 14)
    for name in ("loss_mask_final", "loss_mask_refined"):
        assert torch.isfinite(losses[name]) and losses[name] > 0
    (losses["loss_mask_final"] + losses["loss_mask_refined"]).backward()
    assert _grad_norm(heads.final_mask_head.parameters()) > 0
    _, raw, final = _raw_candidates(*opts, "MODEL.MNC.TEST.MASK_VOTING", False)
    kept = raw.kept_rank >= 0
    assert raw.pred_masks[kept].shape[-2:] == (28, 28) and len(final) > 0


def test_final_head_pools_only_the_foreground_rois(monkeypatch):
    """In training the final head's pooler reads stage 2's foreground RoIs only (as Mask R-CNN's mask head):
    the same features as pooling every RoI and keeping the foreground, without RoIAlign's backward on the rest."""
    from detectron2.modeling.poolers import ROIPooler

    from mnc_d2.modeling.roi_heads import MNCROIHeads

    calls, sampled = [], []
    pool, label = ROIPooler.forward, MNCROIHeads.label_and_sample_proposals
    monkeypatch.setattr(ROIPooler, "forward",
                        lambda self, x, boxes: calls.append((self, x, boxes)) or pool(self, x, boxes))
    monkeypatch.setattr(MNCROIHeads, "label_and_sample_proposals",
                        lambda self, *a: sampled.extend(label(self, *a)) or sampled[-len(a[0]):])
    opts = ("MODEL.MNC.FINAL_MASK_HEAD.ENABLED", True, "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
            "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 8, "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", True,
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, "MODEL.MNC.PATHWAY_POOL", 1,
            "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER", True, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14)
    model, losses = train_losses(*opts)
    heads = model.roi_heads
    final_calls = [(x, boxes) for pooler, x, boxes in calls if pooler is heads.final_pooler]
    assert len(final_calls) == 1  # loss_mask_final (no refined loss here)
    x, fg_boxes = final_calls[0]
    num_rois = sum(len(r) for r in sampled)
    is_fg = torch.cat([r.gt_classes < heads.num_classes for r in sampled])
    assert 0 < sum(len(b) for b in fg_boxes) == is_fg.sum() < num_rois
    with torch.no_grad():
        every = pool(heads.final_pooler, x, [Boxes(r.proposal_boxes.tensor.detach()) for r in sampled])
        assert torch.equal(every[is_fg], pool(heads.final_pooler, x, fg_boxes))


def test_final_mask_head_needs_masks_on_final_boxes():
    import pytest

    with pytest.raises(ValueError, match="MASKS_ON_FINAL_BOXES"):
        build_model(small_cfg("MODEL.MNC.FINAL_MASK_HEAD.ENABLED", True))


def test_empty_voted_mask_falls_back_to_the_regressed_box():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0]])  # the proposal the mask was predicted in
    regressed = torch.tensor([[12.0, 8.0, 55.0, 47.0]])
    masks = torch.zeros(1, 7, 7)  # voted mask empty
    _, voted_boxes = mask_voting(boxes, masks, torch.ones(1), torch.zeros(1, dtype=torch.long),
                                 torch.tensor([0]), (64, 64), fallback_boxes=regressed)
    assert torch.equal(voted_boxes, regressed)


# ------------------------------------------------------------------ mask head cost
def test_mask_head_conv_kernel_1_is_a_channel_reduction():
    model, losses = train_losses("MODEL.MNC.MASK_HEAD.CONV_KERNEL", 1)
    conv = model.roi_heads.mask_head.convs[0]
    assert conv.kernel_size == (1, 1)
    assert torch.isfinite(sum(losses.values()))


# ------------------------------------------------------------------ the paper config
def test_paper_config_trains_infers_and_survives_an_empty_batch():
    import os

    import mnc_d2
    from conftest import REPO, make_batch
    from detectron2.config import get_cfg

    cfg = get_cfg()
    mnc_d2.add_mnc_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "mnc_R18_GN_FPN_shapes_cpu_paper.yaml"))
    small = small_cfg()  # the unit-test reductions of the CPU config, applied on top of the paper config
    cfg.merge_from_list(["MODEL.FPN.OUT_CHANNELS", small.MODEL.FPN.OUT_CHANNELS, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
                         "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 8, "MODEL.MNC.MASK_HEAD.FC_DIM", 64,
                         "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    mnc = cfg.MODEL.MNC
    assert (mnc.NUM_STAGES, mnc.MASK_HEAD.NUM_CONV, mnc.MASK_HEAD.MASK_SIZE, mnc.SEGMENT_GATING,
            mnc.SEGMENT_CLASSIFIER.ENABLED, mnc.BOX_GRADIENTS.ENABLED, mnc.BOX_GRADIENTS.DELTA_CLIP) == (
        5, 0, 21, True, True, True, 1 / 512)
    torch.manual_seed(0)
    model = build_model(cfg)
    for with_gt in ((True, True), (False, False)):
        model.train()
        with EventStorage():
            losses = model(make_batch(with_gt=with_gt))
        assert {"loss_seg_cls", "loss_seg_cls_stage5", "loss_mask_stage4"} <= set(losses)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
    model.eval()
    with torch.no_grad():
        out = model([{"image": b["image"]} for b in make_batch()])
    assert all(len(o["instances"]) > 0 for o in out)
