"""Issue 3's model parts: gradients through box coordinates (RPN -> RoI warp), five stages with shared
weights, the segment-aware classifier."""
import torch

from conftest import make_targets, small_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from mnc_d2.modeling.box_gradients import clip_box_gradient

IMAGE_SIZE = (200, 250)
# Large objects: many random-init proposals overlap them at IoU >= 0.5, so foreground RoIs come from
# the RPN (not only from the appended GT boxes, which carry no gradient).
BIG_BOXES = ((0, 0, 250, 200), (10, 5, 240, 190))


def batch(boxes=BIG_BOXES, classes=(1, 2)):
    g = torch.Generator().manual_seed(0)
    return [{"image": (torch.rand((3, *IMAGE_SIZE), generator=g) * 255).float(),
             "instances": make_targets(IMAGE_SIZE, boxes=boxes, classes=classes)} for _ in range(2)]


def train_losses(*opts, inputs=None):
    cfg = small_cfg("MODEL.RPN.POST_NMS_TOPK_TRAIN", 100, *opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(inputs or batch())
    return model, losses


def _grad_norm(params):
    return sum(p.grad.abs().sum().item() for p in params if p.grad is not None)


def test_box_gradients_reach_rpn_deltas_from_mask_loss_alone():
    model, losses = train_losses("MODEL.MNC.BOX_GRADIENTS.ENABLED", True)
    losses["loss_mask"].backward()
    deltas = model.proposal_generator.rpn_head.anchor_deltas
    assert _grad_norm(deltas.parameters()) > 0
    assert _grad_norm(model.proposal_generator.rpn_head.objectness_logits.parameters()) == 0


def test_without_box_gradients_rpn_deltas_get_nothing_from_mask_loss():
    model, losses = train_losses("MODEL.MNC.BOX_GRADIENTS.ENABLED", False)
    losses["loss_mask"].backward()
    assert _grad_norm(model.proposal_generator.rpn_head.anchor_deltas.parameters()) == 0


def test_box_gradient_clip():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    (clip_box_gradient(boxes * 1, 0.5) * torch.tensor([[10.0, -10.0, 0.1, -0.1]])).sum().backward()
    assert torch.equal(boxes.grad, torch.tensor([[0.5, -0.5, 0.1, -0.1]]))


def test_five_stages_report_losses_per_stage_and_share_weights():
    model3, _ = train_losses("MODEL.MNC.NUM_STAGES", 3)
    model5, losses = train_losses("MODEL.MNC.NUM_STAGES", 5)
    assert {"loss_mask_stage4", "loss_cls_stage5", "loss_box_reg_stage5"} <= set(losses)
    assert {"loss_mask", "loss_cls", "loss_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # shared weights: no extra parameter exists for stages 4/5
    assert model5.state_dict().keys() == model3.state_dict().keys()
    # stage 4's loss trains the very mask head of stage 2
    losses["loss_mask_stage4"].backward()
    assert _grad_norm(model5.roi_heads.mask_head.parameters()) > 0


def test_five_stage_refinement_passes_box_gradients_only_when_enabled():
    for enabled in (True, False):
        model, losses = train_losses("MODEL.MNC.NUM_STAGES", 5, "MODEL.MNC.BOX_GRADIENTS.ENABLED", enabled)
        losses["loss_mask_stage4"].backward()  # reaches stage-3 box deltas only through refined boxes
        got = _grad_norm(model.roi_heads.box_predictor.bbox_pred.parameters())
        assert (got > 0) == enabled, (enabled, got)


def test_five_stage_inference_merges_both_stages():
    cfg = small_cfg("MODEL.MNC.NUM_STAGES", 5, "MODEL.MNC.TEST.MASK_VOTING", False)
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():
        raw = model.inference([{"image": batch()[0]["image"]}], do_postprocess=False)[0]
        out = model([{"image": batch()[0]["image"]}])[0]["instances"]
    num_rois = cfg.MODEL.RPN.POST_NMS_TOPK_TEST
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert num_rois * k < len(raw) <= 2 * num_rois * k  # SCORE_THRESH_TEST 0: every (RoI, class) of both
    assert len(out) == (raw.kept_rank >= 0).sum()


def test_five_stage_inference_with_an_image_without_proposals():
    """A collapsed RPN can leave an image with no proposal at all (seen in a benchmark run)."""
    from detectron2.structures import Boxes, Instances

    for voting in (True, False):
        cfg = small_cfg("MODEL.MNC.NUM_STAGES", 5, "MODEL.MNC.TEST.MASK_VOTING", voting)
        model = build_model(cfg)
        model.eval()
        empty = Instances(IMAGE_SIZE, proposal_boxes=Boxes(torch.zeros(0, 4)), objectness_logits=torch.zeros(0))
        some = Instances(IMAGE_SIZE, proposal_boxes=Boxes(torch.tensor([[10.0, 10.0, 120.0, 150.0]])),
                         objectness_logits=torch.zeros(1))
        images = [{"image": b["image"]} for b in batch()]
        model.proposal_generator.forward = lambda images, features, gt=None: ([empty], {})
        with torch.no_grad():
            out = model(images[:1])  # batch 1, as in evaluation: no RoI at all
        assert len(out[0]["instances"]) == 0 and out[0]["instances"].pred_masks.shape[1:] == IMAGE_SIZE
        model.proposal_generator.forward = lambda images, features, gt=None: ([empty, some], {})
        with torch.no_grad():
            out = model(images)
        assert len(out[0]["instances"]) == 0 and len(out[1]["instances"]) > 0


def test_segment_gating_switch_decides_whether_stage3_reaches_the_mask_head():
    for gating, mask_iou, expect_gradient in ((True, 0.0, True), (True, 1.01, False), (False, 1.01, True)):
        model, losses = train_losses("MODEL.MNC.SEGMENT_GATING", gating, "MODEL.MNC.SEGMENT_CLASSIFIER.MASK_IOU", mask_iou)
        assert "loss_seg_cls" not in losses  # gating needs segment labels, not the classifier
        losses["loss_cls"].backward()
        got = _grad_norm(model.roi_heads.mask_head.parameters())
        assert (got > 0) == expect_gradient, (gating, mask_iou, got)


def test_segment_gating_passes_gradient_only_through_segment_positive_rois():
    """Per RoI: stage 3's loss reaches a RoI's mask logits iff its segment label is positive."""
    cfg = small_cfg("MODEL.RPN.POST_NMS_TOPK_TRAIN", 100, "MODEL.MNC.SEGMENT_GATING", True,
                    "MODEL.MNC.SEGMENT_CLASSIFIER.MASK_IOU", 0.3)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    heads, captured = model.roi_heads, {}
    mask_logits_fn, labels_fn = heads._mask_logits, heads._segment_labels

    def mask_logits(*args, **kwargs):
        captured["logits"] = mask_logits_fn(*args, **kwargs)
        captured["logits"].retain_grad()
        return captured["logits"]

    def segment_labels(*args, **kwargs):
        captured["labels"] = labels_fn(*args, **kwargs)
        return captured["labels"]

    heads._mask_logits, heads._segment_labels = mask_logits, segment_labels
    with EventStorage():
        losses = model(batch())
    losses["loss_cls"].backward()
    positive = captured["labels"] < cfg.MODEL.ROI_HEADS.NUM_CLASSES
    reached = captured["logits"].grad.flatten(1).abs().sum(1) > 0
    assert 0 < positive.sum() < len(positive), "the check needs positive and negative segments"
    assert torch.equal(reached, positive)


def test_segment_classifier_scores_detections_at_test_time():
    cfg = small_cfg("MODEL.MNC.SEGMENT_CLASSIFIER.ENABLED", True, "MODEL.MNC.TEST.MASK_VOTING", False,
                    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.5)
    model = build_model(cfg)
    with torch.no_grad():  # make the segment classifier say "class 3" for every RoI
        model.roi_heads.segment_classifier.weight.zero_()
        model.roi_heads.segment_classifier.bias.zero_()
        model.roi_heads.segment_classifier.bias[3] = 20.0
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch()[0]["image"]}])[0]["instances"]
    assert len(out) > 0 and (out.pred_classes == 3).all() and (out.scores > 0.99).all()


def test_box_gradient_model_infers_with_roialign_and_the_same_values():
    """With box gradients on, inference (no autograd) pools with RoIAlign: the warp's values, cheaper."""
    from detectron2.structures import Boxes

    cfg = small_cfg("MODEL.MNC.BOX_GRADIENTS.ENABLED", True)
    model = build_model(cfg)
    model.eval()
    heads = model.roi_heads
    assert type(heads.roi_pooler).__name__ == "ROIWarper"
    assert type(heads.inference_pooler).__name__ == "ROIPooler"
    images = model.preprocess_image([{"image": b["image"]} for b in batch()])
    features = [model.backbone(images.tensor)[f] for f in heads.in_features]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(80, 2, generator=g) * 150
    boxes = [Boxes(torch.cat([xy, xy + 8 + torch.rand(80, 2, generator=g) * 90], dim=1))] * 2
    with torch.no_grad():
        warped, aligned = heads.roi_pooler(features, boxes), heads.inference_pooler(features, boxes)
        assert torch.allclose(warped, aligned, atol=1e-4, rtol=1e-4)
        used = []
        heads.inference_pooler.forward = lambda *args: used.append(1) or aligned
        heads._roi_features(features, boxes)
    assert used == [1]
    heads._roi_features(features, boxes)  # with autograd: the warp
    assert used == [1]
