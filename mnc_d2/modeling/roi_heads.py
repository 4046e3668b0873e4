"""MNC's ROI heads: the cascade after stage 1. One loop serves training and inference:

    stage pair k = 0 (stages 2, 3) on the sampled proposals; k = 1 (stages 4, 5; five-stage mode) on the
    boxes refined by stage 3, with the same weights. Each pair:
      RoI features x (R, C, P, P) -> mask head -> mask logits (R, 1, M, M)                  loss_mask
      box pathway(x) ++ segment pathway(x * resize(sigmoid(mask logits)))
        -> class scores (R, K+1), box deltas (R, K*4) [, segment-classifier scores (R, K+1)]
                                                                loss_cls, loss_box_reg [, loss_seg_cls]
The output masks come from the output mask branch (:mod:`mnc_d2.modeling.output_masks`: the final mask head on
the final boxes; loss_mask_final, loss_mask_refined). Inference returns, per image, ALL scored candidates with their
NMS rank (``kept_rank``); the MNC meta-architecture pastes / votes masks in image space (:func:`mnc_postprocess`).

Shape shorthand: N = images, R = RoIs over the batch, K = foreground classes, C = RoI feature
channels, P = RoI feature side, M = mask side.

Conventions kept from Detectron2: the background class is the LAST index (K); MNC's code uses 0.
"""
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, ROIHeads
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from ..utils.errors import ConfigError
from .inference import select_candidates
from .box_gradients import clip_box_gradient, clip_delta_gradient
from .output_masks import OutputMaskBranch
from .mask_ops import mask_loss, mask_pooled_features, mask_targets, max_pool_square, segment_iou_with_whole_gt
from .sampling import sample_mnc_rois

logger = logging.getLogger(__name__)

# State-dict names of the stage-3 pathways before they were renamed (checkpoints of mnc_d2 <= 0.2 and
# D2 checkpoints, whose box head is our box pathway) -> today's names. Mapped on load.
LEGACY_PATHWAY_KEYS = {"box_head.": "box_pathway.", "seg_head.": "segment_pathway."}


def rename_legacy_pathway_keys(state_dict: Dict[str, object], prefix: str) -> None:
    """In place: ``{prefix}box_head.*`` -> ``{prefix}box_pathway.*``, ``{prefix}seg_head.*`` ->
    ``{prefix}segment_pathway.*``, unless the new name is present already."""
    for key in list(state_dict):
        for old, new in LEGACY_PATHWAY_KEYS.items():
            if key.startswith(prefix + old) and prefix + new + key[len(prefix + old):] not in state_dict:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


_logged_once = set()


def mnc_cfg_as_built(cfg):
    """The config MNC's ROI heads are built from: ``cfg`` with the changes MNC makes to a D2 config, each logged
    (the one a D2 config always triggers, once per process at INFO; the others, WARNING):

    * ``MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK`` True: MNC's masks are class-agnostic (one per RoI, scored by stage 3).
    * A C4 config (no ``ROI_BOX_HEAD.NAME``; D2's Res5ROIHeads runs res5 on 14x14 RoI features): MNC reads 7x7 RoI
      features of res4 and builds the pathways of configs/mnc_R_50_C4_1x.yaml (conv 256 + 2 FC).
    * ``MODEL.MNC.PATHWAY_POOL`` 1 when it does not divide ``ROI_BOX_HEAD.POOLER_RESOLUTION`` (e.g. a D2 config's 7x7
      pooler: its box head then matches D2 checkpoints).
    """
    built = cfg.clone()
    built.defrost()
    changes = []
    if not cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK:
        built.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = True
        changes.append((logging.INFO, "MNC's masks are class-agnostic (one mask per RoI, scored by stage 3): its mask "
                                      "heads are built with MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True, whatever the "
                                      "config says (False here)"))
    head = built.MODEL.ROI_BOX_HEAD
    if not head.NAME:
        head.NAME, head.NUM_CONV, head.CONV_DIM, head.NUM_FC, head.FC_DIM = "FastRCNNConvFCHead", 1, 256, 2, 1024
        head.POOLER_RESOLUTION = 7
        changes.append((logging.WARNING, "MODEL.ROI_BOX_HEAD.NAME is empty (a C4 config?): MNC's stages 2 and 3 read "
                                         "7x7 RoI features and its stage-3 pathways are FastRCNNConvFCHead with NUM_CONV "
                                         "1, CONV_DIM 256, NUM_FC 2, FC_DIM 1024 (configs/mnc_R_50_C4_1x.yaml)"))
    if head.POOLER_RESOLUTION % built.MODEL.MNC.PATHWAY_POOL:
        changes.append((logging.WARNING, f"MODEL.MNC.PATHWAY_POOL={built.MODEL.MNC.PATHWAY_POOL} does not divide "
                                         f"MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION={head.POOLER_RESOLUTION}: the stage-3 "
                                         f"pathways read the {head.POOLER_RESOLUTION}x{head.POOLER_RESOLUTION} RoI "
                                         "features unpooled"))
        built.MODEL.MNC.PATHWAY_POOL = 1
    for level, message in changes:
        if level > logging.INFO or message not in _logged_once:
            _logged_once.add(message)
            logger.log(level, message)
    built.freeze()
    return built


def _build_class_agnostic_mask_head(cfg, name: str, input_shape: ShapeSpec) -> nn.Module:
    """The registered mask head ``name``, built from ``cfg`` (MNCMaskHead: MODEL.MNC.MASK_HEAD; D2's heads:
    MODEL.ROI_MASK_HEAD's NUM_CONV / CONV_DIM / NORM), predicting one class-agnostic mask per RoI."""
    head_cfg = cfg.clone()
    head_cfg.defrost()
    head_cfg.MODEL.ROI_MASK_HEAD.NAME = name
    return build_mask_head(head_cfg, input_shape)


def _per_image(tensor: torch.Tensor, counts: List[int]) -> List[torch.Tensor]:
    """``tensor.split(counts)``; one image's rows stay whole, so that a trace (export) does not freeze the count."""
    return [tensor] if len(counts) == 1 else list(tensor.split(counts))


def _mask_areas(gt_masks) -> torch.Tensor:
    """(G,) pixel areas of BitMasks or PolygonMasks."""
    if isinstance(gt_masks, BitMasks):
        return gt_masks.tensor.flatten(1).sum(1).float()
    return torch.as_tensor(gt_masks.area(), dtype=torch.float32)


@dataclass
class StageOutputs:
    """Predictions of one stage pair (2/3 or 4/5) on R RoIs."""
    boxes: List[Boxes]  # per image, the RoIs the pair ran on (with their graph when box gradients are on)
    mask_logits: torch.Tensor  # (R, 1, M, M) stage 2/4
    mask_probs: torch.Tensor  # (R, 1, M, M) sigmoid of the logits, as stage 3/5 saw them
    scores: torch.Tensor  # (R, K+1) stage 3/5 class logits
    deltas: torch.Tensor  # (R, K*4) or (R, 4) box deltas
    seg_scores: Optional[torch.Tensor]  # (R, K+1) segment-aware classifier logits, or None
    mask_targets: Optional[torch.Tensor] = None  # (F, M, M) training: targets of the foreground RoIs
    seg_labels: Optional[torch.Tensor] = None  # (R,) training: segment labels (K = background)
    final_features: Optional[torch.Tensor] = None  # (F, C, P', P') training: the final mask head's input


@ROI_HEADS_REGISTRY.register()
class MNCROIHeads(OutputMaskBranch, ROIHeads):
    """Stages 2-5 of MNC (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        roi_pooler: nn.Module,
        mask_head: nn.Module,
        box_pathway: nn.Module,
        segment_pathway: Optional[nn.Module],
        box_predictor: FastRCNNOutputLayers,
        segment_classifier: Optional[nn.Module] = None,
        final_mask_head: Optional[nn.Module] = None,
        final_mask_loss_weight: float = 1.0,
        final_pooler: Optional[nn.Module] = None,
        refined_mask_loss: bool = False,
        segment_gating: bool = False,
        masks_on_final_boxes: bool = False,
        num_stages: int = 3,
        mask_loss_weight: float = 2.0,
        mask_target_threshold: float = 0.4,
        bg_iou_lo: float = 0.1,
        bg_hard_fraction: float = 0.85,
        fg_iou: float = 0.5,
        refined_fg_iou: float = 0.5,
        segment_mask_iou: float = 0.5,
        segment_mask_threshold: float = 0.4,
        box_gradients: bool = False,
        box_gradient_clip: float = 0.0,
        delta_gradient_clip: float = 0.0,
        differentiable_targets: bool = False,
        pathway_pool: int = 1,
        refined_min_size: float = 1.0,
        inference_pooler: Optional[nn.Module] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_stages not in (3, 5):
            raise ConfigError(f"MODEL.MNC.NUM_STAGES must be 3 or 5, got {num_stages}")
        if final_mask_head is not None and not masks_on_final_boxes:
            raise ConfigError("MODEL.MNC.FINAL_MASK_HEAD predicts the masks on the final boxes: it needs "
                              "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES True")
        self.in_features = in_features
        self.roi_pooler = roi_pooler
        self.inference_pooler = inference_pooler  # used instead of roi_pooler when autograd is off
        self.mask_head = mask_head
        self.box_pathway = box_pathway  # stage 3 on the RoI features
        self.segment_pathway = segment_pathway  # stage 3 on the RoI features times the mask; None = ablation
        self.box_predictor = box_predictor
        self.segment_classifier = segment_classifier
        self.final_mask_head = final_mask_head  # None: the stage-2 head predicts the output masks
        self.final_mask_loss_weight = final_mask_loss_weight
        self.final_pooler = final_pooler  # None: the final head reads the cascade's RoI features
        self.refined_mask_loss = refined_mask_loss  # the output mask head also trains on the regressed boxes
        self.segment_gating = segment_gating
        self.masks_on_final_boxes = masks_on_final_boxes
        self.num_stage_pairs = 1 if num_stages == 3 else 2
        self.mask_loss_weight = mask_loss_weight
        self.mask_target_threshold = mask_target_threshold
        self.bg_iou_lo = bg_iou_lo
        self.bg_hard_fraction = bg_hard_fraction
        self.fg_iou = fg_iou
        self.refined_fg_iou = refined_fg_iou
        self.segment_mask_iou = segment_mask_iou
        self.segment_mask_threshold = segment_mask_threshold
        self.box_gradients = box_gradients
        self.box_gradient_clip = box_gradient_clip
        self.delta_gradient_clip = delta_gradient_clip
        self.differentiable_targets = differentiable_targets
        self.pathway_pool = pathway_pool
        self.refined_min_size = refined_min_size

    @property
    def num_stages(self) -> int:
        return 1 + 2 * self.num_stage_pairs

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        if cfg.MODEL.META_ARCHITECTURE != "MNC":
            raise ValueError(
                "MODEL.ROI_HEADS.NAME=MNCROIHeads needs MODEL.META_ARCHITECTURE=MNC (its outputs are "
                f"MNC candidates that the MNC meta-architecture post-processes); got {cfg.MODEL.META_ARCHITECTURE}"
            )
        ret = super().from_config(cfg)
        cfg = mnc_cfg_as_built(cfg)  # the one place MNC changes a config, logged
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
            ret["inference_pooler"] = ROIPooler(output_size=resolution, scales=scales,
                                                        sampling_ratio=mnc.BOX_GRADIENTS.SAMPLING_RATIO,
                                                        pooler_type="ROIAlignV2")
        else:
            roi_pooler = ROIPooler(output_size=resolution, scales=scales,
                                           sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                                           pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE)
        roi_shape = ShapeSpec(channels=in_channels, height=resolution, width=resolution)
        pool = mnc.PATHWAY_POOL
        pathway_shape = ShapeSpec(channels=in_channels, height=resolution // pool, width=resolution // pool)

        mask_head = _build_class_agnostic_mask_head(cfg, mnc.MASK_HEAD.NAME, roi_shape)  # stage 2
        ret.update(cls.output_mask_parts(cfg, _build_class_agnostic_mask_head, roi_shape, scales))  # on final boxes
        box_pathway = build_box_head(cfg, pathway_shape)
        segment_pathway = build_box_head(cfg, pathway_shape) if mnc.SEGMENT_PATHWAY else None
        predictor_channels = box_pathway.output_shape.channels + (
            segment_pathway.output_shape.channels if segment_pathway else 0)
        box_predictor = FastRCNNOutputLayers(cfg, ShapeSpec(channels=predictor_channels))
        segment_classifier = None
        if mnc.SEGMENT_CLASSIFIER.ENABLED:
            segment_classifier = nn.Linear(predictor_channels, cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1)
            nn.init.normal_(segment_classifier.weight, std=0.01)
            nn.init.constant_(segment_classifier.bias, 0)
        ret.update(
            in_features=in_features, roi_pooler=roi_pooler, mask_head=mask_head, box_pathway=box_pathway,
            segment_pathway=segment_pathway, box_predictor=box_predictor, segment_classifier=segment_classifier,
            num_stages=mnc.NUM_STAGES, mask_loss_weight=mnc.MASK_LOSS_WEIGHT,
            mask_target_threshold=mnc.MASK_TARGET_THRESHOLD, bg_iou_lo=mnc.BG_IOU_LO,
            bg_hard_fraction=mnc.BG_HARD_FRACTION, fg_iou=cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[-1],
            refined_fg_iou=mnc.REFINED_FG_IOU, segment_mask_iou=mnc.SEGMENT_CLASSIFIER.MASK_IOU,
            segment_mask_threshold=mnc.SEGMENT_CLASSIFIER.MASK_THRESHOLD,
            refined_mask_loss=mnc.REFINED_MASK_LOSS,
            segment_gating=mnc.SEGMENT_GATING, masks_on_final_boxes=mnc.TEST.MASKS_ON_FINAL_BOXES,
            box_gradients=mnc.BOX_GRADIENTS.ENABLED, box_gradient_clip=mnc.BOX_GRADIENTS.CLIP,
            delta_gradient_clip=mnc.BOX_GRADIENTS.DELTA_CLIP,
            differentiable_targets=mnc.BOX_GRADIENTS.DIFFERENTIABLE_TARGETS,
            pathway_pool=pool, refined_min_size=mnc.REFINED_MIN_SIZE,
        )
        return ret

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rename_legacy_pathway_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        """Stage 2/3 RoIs, MNC sampling (GT appended; <= positive_fraction foreground; hard/easy
        background split). Box coordinates keep their graph (box gradients); matching uses detached copies."""
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

    def label_refined_boxes(self, refined: List[Boxes], targets: List[Instances],
                            prefix: str = "roi_head_stage4") -> List[Instances]:
        """Stage-4/5 RoIs: refined boxes plus GT boxes, labelled at IoU >= refined_fg_iou, no subsampling."""
        labelled = []
        for boxes_i, targets_i in zip(refined, targets):
            rois = Instances(targets_i.image_size)
            rois.proposal_boxes = Boxes.cat([boxes_i, targets_i.gt_boxes]) if len(targets_i) else boxes_i
            max_iou, matched = self._match(rois.proposal_boxes.tensor, targets_i)
            labelled.append(self._with_targets(rois, targets_i, matched, max_iou >= self.refined_fg_iou))
        self._sample_stats(labelled, prefix)
        return labelled

    # ------------------------------------------------------------------ one stage pair
    def _roi_features(self, features: List[torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """(R, C, P, P) RoI features: the one pooling call of every stage. With box gradients the boxes keep
        their graph (through the differentiable warp); without autograd the cheaper inference pooler is used."""
        if self.box_gradients:
            boxes = [Boxes(clip_box_gradient(b.tensor, self.box_gradient_clip)) for b in boxes]
        else:
            boxes = [Boxes(b.tensor.detach()) for b in boxes]
        pooler = self.roi_pooler
        if self.inference_pooler is not None and not torch.is_grad_enabled():
            pooler = self.inference_pooler  # the warp's values; no box graph to keep
        return pooler(features, boxes)

    def _pathway_input(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) -> (R, C, P/k, P/k) max-pooled input of a stage-3 pathway (k = PATHWAY_POOL).
        Without autograd the strided maximum gives the same values, much faster on CPU; in training
        max_pool2d's backward is the cheaper one."""
        if self.pathway_pool <= 1:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return F.max_pool2d(x, self.pathway_pool)
        return max_pool_square(x, self.pathway_pool)

    def _mask_logits(self, roi_features: torch.Tensor, head: Optional[nn.Module] = None) -> torch.Tensor:
        """Stage 2: (R, C, P, P) -> class-agnostic mask logits (R, 1, M, M) of ``head`` (the stage-2 head)."""
        mask_logits = (head or self.mask_head).layers(roi_features)
        if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
            raise ValueError(f"MNC's mask head must be class-agnostic (R, 1, M, M); got {tuple(mask_logits.shape)}. "
                             "Check MODEL.ROI_MASK_HEAD.NAME / CLS_AGNOSTIC_MASK")
        return mask_logits

    def _classify(self, roi_features: torch.Tensor, mask_probs: torch.Tensor):
        """Stage 3: class scores (R, K+1), box deltas (R, K*4), segment-classifier scores (R, K+1) or None."""
        pathways = [self.box_pathway(self._pathway_input(roi_features))]  # (R, D)
        if self.segment_pathway is not None:
            masked = mask_pooled_features(roi_features, mask_probs)  # (R, C, P, P)
            pathways.append(self.segment_pathway(self._pathway_input(masked)))  # (R, D)
        joint = torch.cat(pathways, dim=1)  # (R, 2D)
        scores, deltas = self.box_predictor(joint)
        seg_scores = self.segment_classifier(joint) if self.segment_classifier is not None else None
        return scores, deltas, seg_scores

    @torch.no_grad()
    def _segment_labels(self, mask_probs: torch.Tensor, targets: torch.Tensor, rois: List[Instances]) -> torch.Tensor:
        """(R,) segment labels: the RoI's class if its binarised mask, pasted in the RoI, has IoU >=
        segment_mask_iou with the whole GT mask of its object, else K (background)."""
        gt_classes = cat([r.gt_classes for r in rois])  # (R,)
        fg = gt_classes < self.num_classes
        fg_rois = [r[r.gt_classes < self.num_classes] for r in rois]
        roi_areas = cat([r.proposal_boxes.area() for r in fg_rois]).detach()  # (F,)
        gt_areas = cat([_mask_areas(r.gt_masks).to(roi_areas.device) if r.has("gt_masks") else roi_areas.new_zeros(len(r))
                        for r in fg_rois])  # (F,)
        mask_iou = segment_iou_with_whole_gt(mask_probs[fg], targets, roi_areas, gt_areas,
                                             self.segment_mask_threshold)  # (F,)
        seg_labels = torch.full_like(gt_classes, self.num_classes)
        seg_labels[fg] = torch.where(mask_iou >= self.segment_mask_iou, gt_classes[fg], self.num_classes)
        return seg_labels

    def _run_stage_pair(self, features: List[torch.Tensor], rois: List[Instances], pair: int) -> StageOutputs:
        """Stages 2+3 (pair 0) or 4+5 (pair 1) on ``rois``; in training the RoIs carry their labels."""
        boxes = [r.proposal_boxes for r in rois]
        roi_features = self._roi_features(features, boxes)  # (R, C, P, P)
        mask_logits = self._mask_logits(roi_features)  # (R, 1, M, M)
        mask_probs = mask_logits.sigmoid()  # with gradient: stage 3 trains the mask head through it
        targets = seg_labels = None
        if self.training:
            targets = self._mask_targets(rois, mask_logits.shape[-1])  # (F, M, M)
            if self.segment_classifier is not None or self.segment_gating:
                seg_labels = self._segment_labels(mask_probs, targets, rois)
                seg_positive = seg_labels < self.num_classes
                get_event_storage().put_scalar(f"roi_head{self._suffixes(pair)[1]}/num_seg_positive",
                                               seg_positive.sum().item())
            if self.segment_gating:
                # stage 3 reaches the mask head only through RoIs whose predicted mask is a good segment
                mask_probs = torch.where(seg_positive[:, None, None, None], mask_probs, mask_probs.detach())
        scores, deltas, seg_scores = self._classify(roi_features, mask_probs)
        # the final mask head trains on stage 2's foreground RoIs (output_masks.py)
        final_features = self._final_mask_inputs(features, rois, roi_features) if self.training and pair == 0 else None
        return StageOutputs(boxes, mask_logits, mask_probs, scores, deltas, seg_scores, targets, seg_labels,
                            final_features)

    def _mask_targets(self, rois: List[Instances], mask_size: int) -> torch.Tensor:
        """(F, M, M) MNC mask targets of the foreground RoIs, in RoI order."""
        return cat([
            mask_targets(r.gt_masks[r.gt_classes < self.num_classes],
                         r.proposal_boxes.tensor[r.gt_classes < self.num_classes], mask_size, self.mask_target_threshold)
            if r.has("gt_masks") else r.proposal_boxes.tensor.new_zeros((0, mask_size, mask_size))
            for r in rois
        ])

    @staticmethod
    def _suffixes(pair: int) -> Tuple[str, str]:
        """Loss-name suffixes of a pair's mask stage and classification stage."""
        return ("", "") if pair == 0 else ("_stage4", "_stage5")

    def _losses(self, out: StageOutputs, rois: List[Instances], pair: int) -> Dict[str, torch.Tensor]:
        suffix_mask, suffix_cls = self._suffixes(pair)
        fg = cat([r.gt_classes for r in rois]) < self.num_classes  # (R,)
        losses = {f"loss_mask{suffix_mask}": mask_loss(out.mask_logits[fg], out.mask_targets) * self.mask_loss_weight}
        detached = []
        for r in rois:  # D2's box loss asserts proposals carry no gradient
            d = Instances(r.image_size, proposal_boxes=Boxes(r.proposal_boxes.tensor.detach()), gt_classes=r.gt_classes)
            if r.has("gt_boxes"):
                d.gt_boxes = r.gt_boxes
            detached.append(d)
        box_losses = self.box_predictor.losses((out.scores, out.deltas), detached)
        if self.box_gradients and self.differentiable_targets:
            # regression targets from the live boxes: the loss's gradient reaches them through the targets too
            live = cat([r.proposal_boxes.tensor for r in rois])  # (R, 4)
            gt_boxes = cat([(r.gt_boxes if r.has("gt_boxes") else r.proposal_boxes).tensor for r in rois])
            box_losses["loss_box_reg"] = self.box_predictor.box_reg_loss(
                live, gt_boxes.detach(), out.deltas, cat([r.gt_classes for r in rois]))
        losses.update({f"{k}{suffix_cls}": v for k, v in box_losses.items()})
        if out.final_features is not None:
            losses["loss_mask_final"] = self._final_mask_loss(out.final_features, rois)
        if out.seg_scores is not None:
            losses[f"loss_seg_cls{suffix_cls}"] = F.cross_entropy(out.seg_scores, out.seg_labels)
        return losses

    # ------------------------------------------------------------------ between stage pairs
    def _class_probs(self, out: StageOutputs) -> torch.Tensor:
        """(R, K+1) probabilities used for scoring: the segment-aware classifier's when present."""
        return F.softmax(out.seg_scores if out.seg_scores is not None else out.scores, dim=-1)

    def _predicted_boxes(self, out: StageOutputs) -> torch.Tensor:
        """(R, K*4) or (R, 4) boxes decoded from a pair's deltas; differentiable in both (box gradients,
        the deltas' gradient then bounded as the authors' stage bridge does, per image)."""
        rois, deltas = cat([b.tensor for b in out.boxes]), out.deltas
        if not self.box_gradients:
            rois, deltas = rois.detach(), deltas.detach()
        else:
            deltas = clip_delta_gradient(deltas, self.delta_gradient_clip / max(len(out.boxes), 1), "stage3_delta")
        return self.box_predictor.box2box_transform.apply_deltas(deltas, rois)

    def _refined_boxes(self, out: StageOutputs, image_sizes) -> List[Boxes]:
        """Five-stage mode: each RoI's box moved by the stage-3 deltas of its top foreground class, clipped."""
        probs = self._class_probs(out).detach()
        predicted = self._predicted_boxes(out)  # (R, K*4) or (R, 4)
        num_rois = predicted.shape[0]
        predicted = predicted.view(num_rois, predicted.shape[1] // 4, 4)  # (R, K or 1, 4); R may be 0
        top_class = probs[:, :-1].argmax(dim=1) if predicted.shape[1] > 1 else torch.zeros_like(probs[:, 0]).long()
        refined = predicted[torch.arange(num_rois, device=predicted.device), top_class]  # (R, 4)
        out_boxes = []
        for boxes_i, size in zip(_per_image(refined, [len(b) for b in out.boxes]), image_sizes):
            h, w = size
            x0, y0, x1, y1 = boxes_i.unbind(dim=1)  # clip without in-place ops (keeps the graph)
            out_boxes.append(Boxes(torch.stack([x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)], dim=1)))
        return out_boxes

    def _next_rois(self, out: StageOutputs, rois: List[Instances], targets: Optional[List[Instances]],
                   prefix: str = "roi_head_stage4") -> List[Instances]:
        """RoIs of the next pair: the refined boxes (labelled in training; ``prefix`` of their sample stats)."""
        refined = self._refined_boxes(out, [r.image_size for r in rois])
        # degenerate boxes (e.g. clipped to zero width): infinite regression targets in training, no mask
        refined = [b[Boxes(b.tensor.detach()).nonempty(threshold=self.refined_min_size)] for b in refined]
        if self.training:
            return self.label_refined_boxes(refined, targets, prefix)
        return [Instances(r.image_size, proposal_boxes=b) for r, b in zip(rois, refined)]

    # ------------------------------------------------------------------ forward
    def forward(self, images, features: Dict[str, torch.Tensor], proposals: List[Instances],
                targets: Optional[List[Instances]] = None):
        del images
        features = [features[f] for f in self.in_features]
        if self.training:
            assert targets, "'targets' argument is required during training"
            rois = self.label_and_sample_proposals(proposals, targets)
        else:
            rois = [Instances(p.image_size, proposal_boxes=p.proposal_boxes) for p in proposals]
        losses, outputs = {}, []
        for pair in range(self.num_stage_pairs):
            if pair > 0:
                rois = self._next_rois(outputs[-1], rois, targets)
            outputs.append(self._run_stage_pair(features, rois, pair))
            if self.training:
                losses.update(self._losses(outputs[-1], rois, pair))
                if pair == 0 and self.refined_mask_loss:
                    losses["loss_mask_refined"] = self._refined_mask_loss(features, outputs[0], rois, targets)
        if self.training:
            return [], losses
        candidates = self._inference(outputs, [r.image_size for r in rois])
        if self.masks_on_final_boxes:
            candidates = self._masks_on_final_boxes(features, candidates)
        return candidates, {}

    # ------------------------------------------------------------------ inference
    def _inference(self, outputs: List[StageOutputs], image_sizes) -> List[Instances]:
        """Per image, the candidates of all stage pairs merged (stage 3, then stage 5)."""
        per_pair = []  # per pair, per image: (mask boxes, predicted boxes, probs, mask probs)
        for out in outputs:
            counts = [len(b) for b in out.boxes]
            per_pair.append(list(zip([b.tensor for b in out.boxes], _per_image(self._predicted_boxes(out), counts),
                                     _per_image(self._class_probs(out), counts), _per_image(out.mask_probs, counts))))
        results = []
        for i, image_size in enumerate(image_sizes):
            mask_box, pred_box, prob, mask_prob = (torch.cat(parts) for parts in zip(*[p[i] for p in per_pair]))
            results.append(self._candidates(mask_box, pred_box, prob, mask_prob, image_size))
        return results

    def _candidates(self, mask_boxes, pred_boxes, probs, mask_probs, image_size) -> Instances:
        """Scored candidates of one image (all of them, for voting) with their NMS rank."""
        cand_boxes, cand_scores, cand_classes, cand_rois, keep = select_candidates(
            pred_boxes, probs, image_size, self.box_predictor.test_score_thresh,
            self.box_predictor.test_nms_thresh, self.box_predictor.test_topk_per_image,
        )
        kept_rank = torch.full_like(cand_classes, -1)
        kept_rank[keep] = torch.ones_like(keep).cumsum(0) - 1  # 0, 1, ...: not arange(len(keep)), a trace constant
        out = Instances(image_size)
        out.pred_boxes = Boxes(cand_boxes)
        out.scores = cand_scores
        out.pred_classes = cand_classes
        out.pred_masks = mask_probs[cand_rois]  # (C, 1, M, M) soft
        out.mask_boxes = Boxes(mask_boxes[cand_rois])
        out.kept_rank = kept_rank
        return out
