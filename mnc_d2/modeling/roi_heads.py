"""MNC's ROI heads: stage 2 (class-agnostic masks) and stage 3 (classification + boxes from a box
pathway and a segment pathway), optionally repeated as stages 4/5 on the refined boxes.

Shape shorthand: N = images, R = RoIs over the batch, K = foreground classes, C = RoI feature
channels, P = RoI feature side, M = mask side.

Conventions kept from Detectron2: the background class is the LAST index (K); MNC's code uses 0.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, ROIHeads
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from .inference import select_candidates
from .mask_ops import binary_mask_iou_with_targets, mask_loss, mask_pooled_features, mask_targets, max_pool_square
from .poolers import ParallelROIPooler
from .sampling import sample_mnc_rois

logger = logging.getLogger(__name__)


def _clip_gradient(tensor: torch.Tensor, clip: float) -> torch.Tensor:
    """Identity whose backward clips the gradient elementwise to [-clip, clip] (the original MNC
    clips the gradient reaching box coordinates)."""
    if clip > 0 and tensor.requires_grad:
        tensor.register_hook(lambda grad: grad.clamp(-clip, clip))
    return tensor


def _pathway_head_cfg(cfg):
    """Config of the stage-3 pathway heads. D2's C4 configs have no box head (Res5ROIHeads runs res5
    instead): MNC then builds the head of configs/mnc_R_50_C4_1x.yaml (conv 256 + 2 FC) and says so."""
    if cfg.MODEL.ROI_BOX_HEAD.NAME:
        return cfg
    logger.warning("MODEL.ROI_BOX_HEAD.NAME is empty (a C4 config?): MNC's stage-3 pathways use "
                   "FastRCNNConvFCHead with NUM_CONV 1, CONV_DIM 256, NUM_FC 2, FC_DIM 1024")
    box_cfg = cfg.clone()
    box_cfg.defrost()
    head = box_cfg.MODEL.ROI_BOX_HEAD
    head.NAME, head.NUM_CONV, head.CONV_DIM, head.NUM_FC, head.FC_DIM = "FastRCNNConvFCHead", 1, 256, 2, 1024
    return box_cfg


@ROI_HEADS_REGISTRY.register()
class MNCROIHeads(ROIHeads):
    """
    Training (per stage pair 2/3, and 4/5 in five-stage mode):
      RoI features x (R, C, P, P) -> mask head -> mask logits (R, 1, M, M)      loss_mask
      box pathway(x) ++ segment pathway(x * resize(sigmoid(mask logits)))
        -> class scores (R, K+1), box deltas (R, K*4)                            loss_cls, loss_box_reg
    Inference returns, per image, ALL scored candidates with their NMS rank (``kept_rank``); the MNC
    meta-architecture pastes / votes masks in image space (:func:`mnc_postprocess`).
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        roi_pooler: nn.Module,
        mask_head: nn.Module,
        box_head: nn.Module,
        seg_head: Optional[nn.Module],
        box_predictor: FastRCNNOutputLayers,
        segment_classifier: Optional[nn.Module] = None,
        num_stages: int = 3,
        mask_loss_weight: float = 2.0,
        mask_target_threshold: float = 0.4,
        bg_iou_lo: float = 0.1,
        bg_hard_fraction: float = 0.85,
        fg_iou: float = 0.5,
        refined_fg_iou: float = 0.5,
        segment_mask_iou: float = 0.5,
        mask_threshold: float = 0.4,
        box_gradients: bool = False,
        box_gradient_clip: float = 0.0,
        pathway_pool: int = 1,
        refined_min_size: float = 1.0,
        inference_pooler: Optional[nn.Module] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_stages not in (3, 5):
            raise ValueError(f"MODEL.MNC.NUM_STAGES must be 3 or 5, got {num_stages}")
        self.in_features = in_features
        self.roi_pooler = roi_pooler
        self.inference_pooler = inference_pooler  # used instead of roi_pooler when autograd is off
        self.mask_head = mask_head
        self.box_head = box_head  # box pathway (same name as D2's box head: warm starts load into it)
        self.seg_head = seg_head  # segment pathway; None = ablation without it
        self.box_predictor = box_predictor
        self.segment_classifier = segment_classifier
        self.num_stages = num_stages
        self.mask_loss_weight = mask_loss_weight
        self.mask_target_threshold = mask_target_threshold
        self.bg_iou_lo = bg_iou_lo
        self.bg_hard_fraction = bg_hard_fraction
        self.fg_iou = fg_iou
        self.refined_fg_iou = refined_fg_iou
        self.segment_mask_iou = segment_mask_iou
        self.mask_threshold = mask_threshold
        self.box_gradients = box_gradients
        self.box_gradient_clip = box_gradient_clip
        self.pathway_pool = pathway_pool
        self.refined_min_size = refined_min_size

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        if cfg.MODEL.META_ARCHITECTURE != "MNC":
            raise ValueError(
                "MODEL.ROI_HEADS.NAME=MNCROIHeads needs MODEL.META_ARCHITECTURE=MNC (its outputs are "
                f"MNC candidates that the MNC meta-architecture post-processes); got {cfg.MODEL.META_ARCHITECTURE}"
            )
        ret = super().from_config(cfg)
        mnc = cfg.MODEL.MNC
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        scales = tuple(1.0 / input_shape[k].stride for k in in_features)
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES {in_features} must have equal channels, got {channels}")
        in_channels = channels.pop()
        if mnc.BOX_GRADIENTS.ENABLED:
            from .roi_warp import ROIWarper

            roi_pooler = ROIWarper(output_size=resolution, scales=scales,
                                   sampling_ratio=mnc.BOX_GRADIENTS.SAMPLING_RATIO)
            # without autograd (inference) the warp's values come cheaper from RoIAlign (same sample points)
            ret["inference_pooler"] = ParallelROIPooler(output_size=resolution, scales=scales,
                                                        sampling_ratio=mnc.BOX_GRADIENTS.SAMPLING_RATIO,
                                                        pooler_type="ROIAlignV2")
        else:
            roi_pooler = ParallelROIPooler(output_size=resolution, scales=scales,
                                           sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                                           pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE)
        roi_shape = ShapeSpec(channels=in_channels, height=resolution, width=resolution)
        pool = mnc.PATHWAY_POOL
        if resolution % pool:  # e.g. a D2 config's 7x7 pooler: its box head then matches D2 checkpoints
            logger.warning(f"MODEL.MNC.PATHWAY_POOL={pool} does not divide MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION="
                           f"{resolution}: the stage-3 pathways read the {resolution}x{resolution} RoI features unpooled")
            pool = 1
        pathway_shape = ShapeSpec(channels=in_channels, height=resolution // pool, width=resolution // pool)

        mask_cfg = cfg
        if not cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK and cfg.MODEL.ROI_MASK_HEAD.NAME != "MNCMaskHead":
            # e.g. a D2 Mask R-CNN config switched to MNC: stage 2 predicts ONE mask per RoI
            logger.warning(f"MNC's stage 2 is class-agnostic: building {cfg.MODEL.ROI_MASK_HEAD.NAME} with "
                           "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK=True")
            mask_cfg = cfg.clone()
            mask_cfg.defrost()
            mask_cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = True
        mask_head = build_mask_head(mask_cfg, roi_shape)
        box_cfg = _pathway_head_cfg(cfg)
        box_head = build_box_head(box_cfg, pathway_shape)
        seg_head = build_box_head(box_cfg, pathway_shape) if mnc.SEGMENT_PATHWAY else None
        predictor_channels = box_head.output_shape.channels + (seg_head.output_shape.channels if seg_head else 0)
        predictor_shape = ShapeSpec(channels=predictor_channels)
        box_predictor = FastRCNNOutputLayers(cfg, predictor_shape)
        segment_classifier = None
        if mnc.SEGMENT_CLASSIFIER.ENABLED:
            segment_classifier = nn.Linear(predictor_channels, cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1)
            nn.init.normal_(segment_classifier.weight, std=0.01)
            nn.init.constant_(segment_classifier.bias, 0)
        ret.update(
            in_features=in_features, roi_pooler=roi_pooler, mask_head=mask_head, box_head=box_head,
            seg_head=seg_head, box_predictor=box_predictor, segment_classifier=segment_classifier,
            num_stages=mnc.NUM_STAGES, mask_loss_weight=mnc.MASK_LOSS_WEIGHT,
            mask_target_threshold=mnc.MASK_TARGET_THRESHOLD, bg_iou_lo=mnc.BG_IOU_LO,
            bg_hard_fraction=mnc.BG_HARD_FRACTION, fg_iou=cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[-1],
            refined_fg_iou=mnc.REFINED_FG_IOU, segment_mask_iou=mnc.SEGMENT_CLASSIFIER.MASK_IOU,
            mask_threshold=mnc.TEST.MASK_THRESHOLD, box_gradients=mnc.BOX_GRADIENTS.ENABLED,
            box_gradient_clip=mnc.BOX_GRADIENTS.CLIP, pathway_pool=pool, refined_min_size=mnc.REFINED_MIN_SIZE,
        )
        return ret

    # ------------------------------------------------------------------ labels and sampling
    @torch.no_grad()
    def _match(self, boxes: torch.Tensor, targets: Instances) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P, 4) boxes -> (P,) max IoU with any GT box, (P,) index of that GT box (0 if no GT)."""
        if len(targets) == 0:
            zeros = torch.zeros(len(boxes), device=boxes.device)
            return zeros, zeros.long()
        iou = pairwise_iou(targets.gt_boxes, Boxes(boxes.detach()))  # (G, P)
        return iou.max(dim=0)

    def _with_targets(self, rois: Instances, targets: Instances, matched: torch.Tensor, fg: torch.Tensor) -> Instances:
        """Attach gt_classes (K for background) and the matched GT fields to the RoIs."""
        gt_classes = torch.full((len(rois),), self.num_classes, dtype=torch.int64, device=fg.device)
        if len(targets):
            gt_classes[fg] = targets.gt_classes[matched[fg]]
            for name, value in targets.get_fields().items():
                if name.startswith("gt_") and not rois.has(name):
                    rois.set(name, value[matched])
        rois.gt_classes = gt_classes
        return rois

    @torch.no_grad()
    def _sample_stats(self, rois: List[Instances], prefix: str) -> None:
        num_fg = sum((r.gt_classes < self.num_classes).sum().item() for r in rois) / max(len(rois), 1)
        num_all = sum(len(r) for r in rois) / max(len(rois), 1)
        storage = get_event_storage()
        storage.put_scalar(f"{prefix}/num_fg_samples", num_fg)
        storage.put_scalar(f"{prefix}/num_bg_samples", num_all - num_fg)

    def label_and_sample_proposals(self, proposals: List[Instances], targets: List[Instances]) -> List[Instances]:
        """MNC sampling (GT appended; <= positive_fraction foreground; hard/easy background split).
        Box coordinates keep their graph (box gradients); matching uses detached copies."""
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)
        sampled = []
        for proposals_i, targets_i in zip(proposals, targets):
            max_iou, matched = self._match(proposals_i.proposal_boxes.tensor, targets_i)
            fg_idx, bg_idx = sample_mnc_rois(max_iou, self.batch_size_per_image, self.positive_fraction,
                                             self.fg_iou, self.bg_iou_lo, self.bg_hard_fraction)
            idx = torch.cat([fg_idx, bg_idx])
            fg = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
            fg[: len(fg_idx)] = True
            sampled.append(self._with_targets(proposals_i[idx], targets_i, matched[idx], fg))
        self._sample_stats(sampled, "roi_head")
        return sampled

    def label_refined_boxes(self, refined: List[Boxes], targets: List[Instances]) -> List[Instances]:
        """Stage-4/5 RoIs: refined boxes plus GT boxes, labelled at IoU >= refined_fg_iou, no subsampling."""
        labelled = []
        for boxes_i, targets_i in zip(refined, targets):
            # degenerate boxes (e.g. clipped to zero width) would give infinite regression targets
            boxes_i = boxes_i[Boxes(boxes_i.tensor.detach()).nonempty(threshold=self.refined_min_size)]
            rois = Instances(targets_i.image_size)
            rois.proposal_boxes = Boxes.cat([boxes_i, targets_i.gt_boxes]) if len(targets_i) else boxes_i
            max_iou, matched = self._match(rois.proposal_boxes.tensor, targets_i)
            labelled.append(self._with_targets(rois, targets_i, matched, max_iou >= self.refined_fg_iou))
        self._sample_stats(labelled, "roi_head_stage4")
        return labelled

    # ------------------------------------------------------------------ the stages
    def _stage2(self, features: List[torch.Tensor], boxes: List[Boxes]) -> Tuple[torch.Tensor, torch.Tensor]:
        """RoI features (R, C, P, P) and class-agnostic mask logits (R, 1, M, M)."""
        if self.box_gradients:
            boxes = [Boxes(_clip_gradient(b.tensor, self.box_gradient_clip)) for b in boxes]
        else:
            boxes = [Boxes(b.tensor.detach()) for b in boxes]
        pooler = self.roi_pooler
        if self.inference_pooler is not None and not torch.is_grad_enabled():
            pooler = self.inference_pooler  # the warp's values; no box graph to keep
        roi_features = pooler(features, boxes)  # (R, C, P, P)
        mask_logits = self.mask_head.layers(roi_features)  # (R, 1, M, M)
        if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
            raise ValueError(f"MNC's mask head must be class-agnostic (R, 1, M, M); got {tuple(mask_logits.shape)}. "
                             "Check MODEL.ROI_MASK_HEAD.NAME / CLS_AGNOSTIC_MASK")
        return roi_features, mask_logits

    def _stage3(self, roi_features: torch.Tensor, mask_probs: torch.Tensor):
        """Class scores (R, K+1), box deltas (R, K*4), segment-classifier scores (R, K+1) or None."""
        pathways = [self.box_head(self._pool(roi_features))]  # (R, D)
        if self.seg_head is not None:
            pathways.append(self.seg_head(self._pool(mask_pooled_features(roi_features, mask_probs))))  # (R, D)
        joint = torch.cat(pathways, dim=1)  # (R, 2D)
        scores, deltas = self.box_predictor(joint)
        seg_scores = self.segment_classifier(joint) if self.segment_classifier is not None else None
        return scores, deltas, seg_scores

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) -> (R, C, P/k, P/k) max-pooled input of a stage-3 pathway (k = PATHWAY_POOL).
        Without autograd (inference) the strided maximum is used: the same values, much faster on CPU;
        in training max_pool2d's backward is the cheaper one."""
        if self.pathway_pool <= 1:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return F.max_pool2d(x, self.pathway_pool)
        return max_pool_square(x, self.pathway_pool)

    def _stage_losses(self, features, rois: List[Instances], suffix_mask: str, suffix_cls: str):
        """Stage 2 + stage 3 losses on labelled RoIs; also returns the stage-3 predictions."""
        roi_features, mask_logits = self._stage2(features, [r.proposal_boxes for r in rois])
        mask_size = mask_logits.shape[-1]
        gt_classes = cat([r.gt_classes for r in rois])  # (R,)
        fg = gt_classes < self.num_classes
        targets = cat([
            mask_targets(r.gt_masks[r.gt_classes < self.num_classes],
                         r.proposal_boxes.tensor[r.gt_classes < self.num_classes], mask_size, self.mask_target_threshold)
            if r.has("gt_masks") else mask_logits.new_zeros((0, mask_size, mask_size))
            for r in rois
        ])  # (F, M, M)
        losses = {f"loss_mask{suffix_mask}": mask_loss(mask_logits[fg], targets) * self.mask_loss_weight}

        mask_probs = mask_logits.sigmoid()  # (R, 1, M, M), with gradient into the mask head
        seg_labels = None
        if self.segment_classifier is not None:
            with torch.no_grad():
                mask_iou = binary_mask_iou_with_targets(mask_probs[fg], targets, self.mask_threshold)  # (F,)
                seg_labels = torch.full_like(gt_classes, self.num_classes)
                seg_labels[fg] = torch.where(mask_iou >= self.segment_mask_iou, gt_classes[fg], self.num_classes)
                seg_positive = seg_labels < self.num_classes
            # stage 3 reaches the mask head only through RoIs whose predicted mask is a good segment
            mask_probs = torch.where(seg_positive[:, None, None, None], mask_probs, mask_probs.detach())
            get_event_storage().put_scalar(f"roi_head{suffix_cls}/num_seg_positive", seg_positive.sum().item())

        scores, deltas, seg_scores = self._stage3(roi_features, mask_probs)
        detached = []
        for r in rois:  # D2's box loss asserts proposals carry no gradient
            d = Instances(r.image_size, proposal_boxes=Boxes(r.proposal_boxes.tensor.detach()), gt_classes=r.gt_classes)
            if r.has("gt_boxes"):
                d.gt_boxes = r.gt_boxes
            detached.append(d)
        box_losses = self.box_predictor.losses((scores, deltas), detached)
        losses.update({f"{k}{suffix_cls}": v for k, v in box_losses.items()})
        if seg_scores is not None:
            losses[f"loss_seg_cls{suffix_cls}"] = F.cross_entropy(seg_scores, seg_labels)
        return losses, (scores, deltas, seg_scores)

    def _class_probs(self, scores: torch.Tensor, seg_scores: Optional[torch.Tensor]) -> torch.Tensor:
        """(R, K+1) probabilities used for scoring: the segment-aware classifier's when present."""
        return F.softmax(seg_scores if seg_scores is not None else scores, dim=-1)

    def _predicted_boxes(self, deltas: torch.Tensor, boxes: List[Boxes]) -> torch.Tensor:
        """(R, K*4) or (R, 4) boxes decoded from deltas; differentiable in both (box gradients)."""
        rois = cat([b.tensor for b in boxes])
        if not self.box_gradients:
            rois, deltas = rois.detach(), deltas.detach()
        return self.box_predictor.box2box_transform.apply_deltas(deltas, rois)

    def _refine(self, deltas: torch.Tensor, probs: torch.Tensor, boxes: List[Boxes], image_sizes) -> List[Boxes]:
        """Five-stage mode: each RoI's box moved by the stage-3 deltas of its top foreground class."""
        predicted = self._predicted_boxes(deltas, boxes)  # (R, K*4) or (R, 4)
        num_rois = predicted.shape[0]
        predicted = predicted.view(num_rois, predicted.shape[1] // 4, 4)  # (R, K or 1, 4); R may be 0
        top_class = probs[:, :-1].argmax(dim=1) if predicted.shape[1] > 1 else torch.zeros_like(probs[:, 0]).long()
        refined = predicted[torch.arange(num_rois, device=predicted.device), top_class]  # (R, 4)
        out = []
        for boxes_i, size in zip(refined.split([len(b) for b in boxes]), image_sizes):
            h, w = size
            x0, y0, x1, y1 = boxes_i.unbind(dim=1)  # clip without in-place ops (keeps the graph)
            out.append(Boxes(torch.stack([x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)], dim=1)))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, images, features: Dict[str, torch.Tensor], proposals: List[Instances],
                targets: Optional[List[Instances]] = None):
        del images
        features = [features[f] for f in self.in_features]
        if self.training:
            assert targets, "'targets' argument is required during training"
            rois = self.label_and_sample_proposals(proposals, targets)
            losses, (scores, deltas, seg_scores) = self._stage_losses(features, rois, "", "")
            if self.num_stages == 5:
                refined = self._refine(deltas, self._class_probs(scores, seg_scores).detach(),
                                       [r.proposal_boxes for r in rois], [r.image_size for r in rois])
                rois5 = self.label_refined_boxes(refined, targets)
                losses5, _ = self._stage_losses(features, rois5, "_stage4", "_stage5")
                losses.update(losses5)
            return [], losses
        return self._inference(features, [p.proposal_boxes for p in proposals], [p.image_size for p in proposals]), {}

    def _inference(self, features, boxes: List[Boxes], image_sizes) -> List[Instances]:
        stage_outputs = []  # per stage pair: (boxes, predicted boxes (R, K*4), probs (R, K+1), mask probs)
        for stage in range(1 if self.num_stages == 3 else 2):
            roi_features, mask_logits = self._stage2(features, boxes)
            mask_probs = mask_logits.sigmoid()  # (R, 1, M, M)
            scores, deltas, seg_scores = self._stage3(roi_features, mask_probs)
            probs = self._class_probs(scores, seg_scores)
            stage_outputs.append((boxes, self._predicted_boxes(deltas, boxes), probs, mask_probs))
            if stage == 0 and self.num_stages == 5:
                boxes = self._refine(deltas, probs, boxes, image_sizes)

        counts = [len(b) for b in boxes]
        results = []
        for i, image_size in enumerate(image_sizes):
            # merge the candidates of stage 3 and (five-stage) stage 5 of image i
            per_stage = [[t.split(counts)[i] if isinstance(t, torch.Tensor) else t[i].tensor for t in out]
                         for out in stage_outputs]
            mask_box, pred_box, prob, mask_prob = (torch.cat(parts) for parts in zip(*per_stage))
            results.append(self._candidates(mask_box, pred_box, prob, mask_prob, image_size))
        return results

    def _candidates(self, mask_boxes, pred_boxes, probs, mask_probs, image_size) -> Instances:
        """Scored candidates of one image (all of them, for voting) with their NMS rank."""
        cand_boxes, cand_scores, cand_classes, cand_rois, keep = select_candidates(
            pred_boxes, probs, image_size, self.box_predictor.test_score_thresh,
            self.box_predictor.test_nms_thresh, self.box_predictor.test_topk_per_image,
        )
        kept_rank = torch.full_like(cand_classes, -1)
        kept_rank[keep] = torch.arange(len(keep), device=keep.device)
        out = Instances(image_size)
        out.pred_boxes = Boxes(cand_boxes)
        out.scores = cand_scores
        out.pred_classes = cand_classes
        out.pred_masks = mask_probs[cand_rois]  # (C, 1, M, M) soft
        out.mask_boxes = Boxes(mask_boxes[cand_rois])
        out.kept_rank = kept_rank
        return out

    def forward_with_given_boxes(self, features: Dict[str, torch.Tensor], instances: List[Instances]) -> List[Instances]:
        """Masks for given detections (``pred_boxes``, ``pred_classes``; ``scores`` optional)."""
        features = [features[f] for f in self.in_features]
        _, mask_logits = self._stage2(features, [x.pred_boxes for x in instances])
        out = []
        for inst, logits in zip(instances, mask_logits.split([len(x) for x in instances])):
            inst = Instances(inst.image_size, **inst.get_fields())
            if not inst.has("scores"):
                inst.scores = torch.ones(len(inst), device=logits.device)
            inst.pred_masks = logits.sigmoid()
            inst.mask_boxes = inst.pred_boxes
            inst.kept_rank = torch.arange(len(inst), device=logits.device)
            out.append(inst)
        return out
