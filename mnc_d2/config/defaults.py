"""Config keys of mnc_d2. ``add_mnc_config`` only ADDS keys, and their defaults are MNC's default, the model
measured against Mask R-CNN: a D2 Mask R-CNN config plus ``MODEL.META_ARCHITECTURE MNC`` and
``MODEL.ROI_HEADS.NAME MNCROIHeads`` builds it. ``configs/Base-MNC.yaml`` adds only D2 keys (the authors' RoI
sampling and proposal counts), the paper configs set every authors' value explicitly.

``upgrade_config_dict`` converts a config of format 1 (mnc_d2 0.1; ``MODEL.MNC.VERSION`` absent) to today's,
as D2's ``upgrade_config`` does for D2's own keys.
"""
import logging

from detectron2.config import CfgNode as CN

__all__ = ["add_mnc_config", "upgrade_config_dict", "CONFIG_VERSION", "FORMAT1_KEYS"]

logger = logging.getLogger(__name__)

# Version of the MODEL.MNC keys. 2: ROI_MASK_HEAD is the output mask head, MNC.MASK_HEAD.NAME the stage-2 head.
CONFIG_VERSION = 2
# Keys of format 1 that format 2 replaced (see upgrade_config_dict), with what replaced them.
FORMAT1_KEYS = {
    "MODEL.MNC.FINAL_MASK_HEAD.NAME": "MODEL.MNC.FINAL_MASK_HEAD.ENABLED and MODEL.ROI_MASK_HEAD.NAME",
    "MODEL.MNC.FINAL_MASK_HEAD.POOLER_RESOLUTION": "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER and "
                                                   "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION",
}
# Format 1's defaults where format 2's differ: a format-1 file that did not set a key meant these.
_FORMAT1_DEFAULTS = {"PATHWAY_POOL": 2, "REFINED_MASK_LOSS": False,
                     "TEST": {"MASK_THRESHOLD": 0.4, "MASK_VOTING": True, "MASKS_ON_FINAL_BOXES": False}}


def _is_format1(config: dict) -> bool:
    """A config dict (a yaml file, ``_BASE_`` merged) written for format 1: it has no MODEL.MNC.VERSION and sets
    a format-1 key, or names the paper's head as D2's mask head (format 1's way to choose the stage-2 head)."""
    model = config.get("MODEL") or {}
    mnc = model.get("MNC") or {}
    if "VERSION" in mnc:
        return False
    final = mnc.get("FINAL_MASK_HEAD") or {}
    return "NAME" in final or "POOLER_RESOLUTION" in final or (model.get("ROI_MASK_HEAD") or {}).get("NAME") == "MNCMaskHead"


def upgrade_config_dict(config: dict, source: str = "config") -> bool:
    """In place: a format-1 config dict -> format 2; returns whether it was format 1 (else nothing changes).

    Format 1 built the stage-2 head from ``ROI_MASK_HEAD.NAME`` and an optional output head from
    ``MNC.FINAL_MASK_HEAD.NAME`` ("" = none) reading its own RoIAlign at ``FINAL_MASK_HEAD.POOLER_RESOLUTION``
    (0 = the cascade's RoI features); keys it did not set took format 1's defaults (the authors' output path).
    """
    if not _is_format1(config):
        return False
    model = config.setdefault("MODEL", {})
    mnc = model.setdefault("MNC", {})
    roi_mask = model.setdefault("ROI_MASK_HEAD", {})
    final = mnc.setdefault("FINAL_MASK_HEAD", {})
    mnc.setdefault("MASK_HEAD", {})["NAME"] = roi_mask.get("NAME", "MaskRCNNConvUpsampleHead")  # D2's default
    name, resolution = final.pop("NAME", ""), final.pop("POOLER_RESOLUTION", 0)
    final["ENABLED"] = bool(name)
    roi_mask["NAME"] = name or "MaskRCNNConvUpsampleHead"
    if name:
        final["OWN_POOLER"] = resolution > 0
    if resolution > 0:
        roi_mask["POOLER_RESOLUTION"] = resolution
    for key, value in _FORMAT1_DEFAULTS.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                mnc.setdefault(key, {}).setdefault(sub_key, sub_value)
        else:
            mnc.setdefault(key, value)
    mnc["VERSION"] = CONFIG_VERSION
    logger.info(f"{source}: upgraded MODEL.MNC from config format 1 to {CONFIG_VERSION} (stage-2 head "
                f"{mnc['MASK_HEAD']['NAME']}, output mask head {name or 'none'})")
    return True


def add_mnc_config(cfg):
    """Add the keys read by mnc_d2 to a detectron2 config (in place). Safe to call twice."""
    if hasattr(cfg.MODEL, "MNC"):
        return cfg
    _C = cfg
    _C.MODEL.MNC = CN()
    # Format of the MODEL.MNC keys (a config without it is upgraded from format 1: upgrade_config_dict).
    _C.MODEL.MNC.VERSION = CONFIG_VERSION
    # Number of cascade stages: 3 (RPN -> masks -> classes) or 5 (+ stages 4/5 on the boxes refined
    # by stage 3, sharing the weights of stages 2/3).
    _C.MODEL.MNC.NUM_STAGES = 3
    # Weight of the stage-2 mask loss (the reference uses 2).
    _C.MODEL.MNC.MASK_LOSS_WEIGHT = 2.0
    # Mask targets: the GT mask inside each RoI is resized to the mask size and binarised at this value.
    _C.MODEL.MNC.MASK_TARGET_THRESHOLD = 0.4
    # Background RoIs: a fraction BG_HARD_FRACTION comes from IoU [BG_IOU_LO, fg threshold), the rest
    # from IoU [0, BG_IOU_LO). Foreground threshold and fraction are D2's ROI_HEADS keys.
    _C.MODEL.MNC.BG_IOU_LO = 0.1
    # Share of sampled background RoIs taken from the "hard" IoU range [BG_IOU_LO, fg threshold).
    _C.MODEL.MNC.BG_HARD_FRACTION = 0.85
    # IoU with a GT box at which stage-4/5 RoIs (refined boxes) count as foreground (no subsampling).
    _C.MODEL.MNC.REFINED_FG_IOU = 0.5
    # Stage-3 pathways: both are built from MODEL.ROI_BOX_HEAD (NUM_FC, FC_DIM, NUM_CONV, ...); the
    # segment pathway sees RoI features multiplied by the stage-2 soft mask. Set False for an ablation
    # that drops the segment pathway (box pathway only).
    _C.MODEL.MNC.SEGMENT_PATHWAY = True
    # Max-pool kernel applied to the (masked) RoI features before the stage-3 FCs: the authors pool their
    # 14x14 RoI features 2x2 before fc6 / fc6_mask (paper configs: 2). 1 = no pooling, for D2's 7x7 features.
    _C.MODEL.MNC.PATHWAY_POOL = 1
    # Stage-4/5 RoIs (refined boxes) with a side shorter than this many pixels are dropped in training.
    _C.MODEL.MNC.REFINED_MIN_SIZE = 1.0

    # Stage 2: the class-agnostic mask head on the cascade's RoIs (all of them: 200-1000 per test image).
    _C.MODEL.MNC.MASK_HEAD = CN()
    # Registered mask-head name. "MNCMaskHead" is the paper's FC head (the keys below); a D2 head such as
    # "MaskRCNNConvUpsampleHead" is built from MODEL.ROI_MASK_HEAD's NUM_CONV / CONV_DIM / NORM, class-agnostic.
    _C.MODEL.MNC.MASK_HEAD.NAME = "MNCMaskHead"
    # MNCMaskHead: number of 3x3 convs (each CONV_DIM channels) before the FC layers (0 = paper).
    _C.MODEL.MNC.MASK_HEAD.NUM_CONV = 0
    # MNCMaskHead: channels of those convs.
    _C.MODEL.MNC.MASK_HEAD.CONV_DIM = 256
    # MNCMaskHead: kernel side of those convs: 3, or 1 for a cheap channel reduction before the FC layer
    # (on 300 test RoIs a 3x3 conv costs more than the backbone; the paper's head has no conv).
    _C.MODEL.MNC.MASK_HEAD.CONV_KERNEL = 3
    # MNCMaskHead: width of the hidden FC layer (the reference uses 256).
    _C.MODEL.MNC.MASK_HEAD.FC_DIM = 256
    # MNCMaskHead: side of the predicted mask, M (the reference uses 21).
    _C.MODEL.MNC.MASK_HEAD.MASK_SIZE = 21

    # The output mask head: Detectron2's mask head MODEL.ROI_MASK_HEAD (NAME, NUM_CONV, CONV_DIM, NORM, and its
    # own RoIAlign at POOLER_RESOLUTION / POOLER_TYPE / POOLER_SAMPLING_RATIO), class-agnostic, predicts the
    # output masks on the final boxes (needs TEST.MASKS_ON_FINAL_BOXES): a cheap head for the cascade's RoIs,
    # a strong one for the <= 100 detections, as Mask R-CNN spends its mask compute. It trains on stage 2's
    # foreground RoIs with its own loss (loss_mask_final).
    _C.MODEL.MNC.FINAL_MASK_HEAD = CN()
    # False: no output head; the stage-2 head's masks are the output masks (the authors' path, paper configs).
    _C.MODEL.MNC.FINAL_MASK_HEAD.ENABLED = True
    # Weight of loss_mask_final (Mask R-CNN's mask loss weight is 1).
    _C.MODEL.MNC.FINAL_MASK_HEAD.LOSS_WEIGHT = 1.0
    # True: its own RoIAlign at MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION, as Mask R-CNN's mask head. False: it
    # reads the cascade's RoI features (ROI_BOX_HEAD.POOLER_RESOLUTION; an ablation).
    _C.MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER = True
    # Train the output mask head (the final head if there is one, else the stage-2 head) also on the
    # foreground boxes as stage 3 regressed them (labelled at REFINED_FG_IOU, detached): the frame in which
    # TEST.MASKS_ON_FINAL_BOXES predicts the output masks. Its loss, loss_mask_refined, has that head's weight
    # (FINAL_MASK_HEAD.LOSS_WEIGHT or MASK_LOSS_WEIGHT). Five stages do this with stage 4; this is the
    # three-stage model's way, without a stage 5. The paper configs: False.
    _C.MODEL.MNC.REFINED_MASK_LOSS = True

    # The authors' gating: stage 3 sends gradient into the mask head (through the soft mask) only via
    # RoIs with a positive segment label (see SEGMENT_CLASSIFIER.MASK_IOU); False = via every RoI.
    _C.MODEL.MNC.SEGMENT_GATING = False

    # End-to-end gradients through box coordinates (RoI warping by bilinear sampling of live boxes).
    _C.MODEL.MNC.BOX_GRADIENTS = CN()
    # Use the differentiable RoI warp (stages 2-5) instead of D2's RoIAlign pooler.
    _C.MODEL.MNC.BOX_GRADIENTS.ENABLED = False
    # Sampling points per bin side of the RoI warp (must be > 0: adaptive sampling is not differentiable).
    _C.MODEL.MNC.BOX_GRADIENTS.SAMPLING_RATIO = 2
    # Gradients reaching box coordinates are clipped elementwise to [-CLIP, CLIP] (0 = off); they are ~1e-5
    # on the CPU config, where 1.0 never binds and training collapsed, and 1e-6 helped (docs/results.md, the cascade ablation).
    _C.MODEL.MNC.BOX_GRADIENTS.CLIP = 1e-6
    # The authors' bound (0 = off; theirs is 1/512 = 0.001953125): the gradient of the predicted box DELTAS
    # (RPN anchor deltas; five stages: stage-3 deltas), after the chain rule through the box size, is
    # clipped elementwise. Conventions: the same bound on every FPN level (deltas are scale-free); per
    # image, i.e. DELTA_CLIP / N on the gradient of D2's batch loss, which averages over N images where
    # the authors had one. The clipped share is logged (box_gradients/*_clipped_fraction). Our losses
    # average over mask pixels where Caffe's summed them, so the same number binds differently here.
    _C.MODEL.MNC.BOX_GRADIENTS.DELTA_CLIP = 0.0
    # Stage-3/5 box-regression targets computed from the LIVE RoI box (differentiable in it) instead of a
    # detached copy: the regression loss then no longer pulls a box away from its object when the head
    # under-predicts the offset (the suspected mechanism of the box-gradient collapse).
    _C.MODEL.MNC.BOX_GRADIENTS.DIFFERENTIABLE_TARGETS = False

    # Segment-aware classifier (the original's second classifier trained on "segment labels").
    _C.MODEL.MNC.SEGMENT_CLASSIFIER = CN()
    # Add the classifier (trained on segment labels: an RoI is foreground only if its binarised predicted
    # mask, pasted in the RoI, has IoU >= MASK_IOU with the WHOLE GT mask); when on it scores detections.
    _C.MODEL.MNC.SEGMENT_CLASSIFIER.ENABLED = False
    # Segment labels (classifier and SEGMENT_GATING): IoU of the pasted binarised mask with the whole GT mask.
    _C.MODEL.MNC.SEGMENT_CLASSIFIER.MASK_IOU = 0.5
    # Segment labels binarise the predicted soft mask at this value (the reference: 0.4, as at test time).
    _C.MODEL.MNC.SEGMENT_CLASSIFIER.MASK_THRESHOLD = 0.4

    # Inference.
    _C.MODEL.MNC.TEST = CN()
    # Output soft masks are binarised at this value: Mask R-CNN's 0.5 for D2's conv head, which predicts the
    # default's output masks; the authors' 0.4 for their FC head (paper configs).
    _C.MODEL.MNC.TEST.MASK_THRESHOLD = 0.5
    # Mask voting: each kept instance's mask becomes the score-weighted mean of the masks of all
    # same-class candidates whose box IoU with it is >= VOTING_IOU; its box is the voted mask's tight box.
    # Voting needs every candidate's mask, i.e. the stage-2 head's: on in the paper configs.
    _C.MODEL.MNC.TEST.MASK_VOTING = False
    # Box IoU for a candidate to take part in a kept instance's vote.
    _C.MODEL.MNC.TEST.VOTING_IOU = 0.5
    # Predict each kept detection's output mask once more, on its final (regressed) box, before voting or
    # pasting (Mask R-CNN's frame); False = the mask predicted on its proposal (the paper's three stages).
    _C.MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES = True

    # The paper's metric, mAP^r (datasets with evaluator_type "mapr", e.g. sbd_2012_val).
    _C.TEST.MAPR = CN()
    # Mask IoU thresholds at which mAP^r is reported (the paper: 0.5 and 0.7).
    _C.TEST.MAPR.IOU_THRESHOLDS = [0.5, 0.7]
    # AP interpolation: "voc07" (11-point; what the MNC/SDS code used), "voc" (continuous), "coco101".
    _C.TEST.MAPR.INTERPOLATION = "voc07"

    # ---- Reliability (mnc_d2.data.mapper, mnc_d2.engine) ----
    _C.MNC_RELIABILITY = CN()
    # A training image that cannot be used (missing, corrupt, size disagreeing with its annotation):
    # "skip" (log its path, count it, train on another image) or "raise". Evaluation always raises.
    _C.MNC_RELIABILITY.BAD_TRAIN_IMAGE = "skip"
    # Larger images (width x height, read from the file's header before decoding) are bad images: the demo skips
    # them, training skips or raises as above, evaluation raises. The demo's peak memory grows by about 125 bytes a
    # pixel (drawing at full resolution): about 3.5 GB at this limit (docs/troubleshooting.md).
    _C.MNC_RELIABILITY.MAX_IMAGE_PIXELS = 20_000_000
    return cfg
