"""Config keys of mnc_d2. ``add_mnc_config`` only ADDS keys; defaults for D2's own keys live in the yaml
files under ``configs/`` (``Base-MNC.yaml`` sets the MNC reference values where D2's defaults differ)."""
from detectron2.config import CfgNode as CN


def add_mnc_config(cfg):
    """Add the keys read by mnc_d2 to a detectron2 config (in place). Safe to call twice."""
    if hasattr(cfg.MODEL, "MNC"):
        return cfg
    _C = cfg
    _C.MODEL.MNC = CN()
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
    # Max-pool kernel applied to the (masked) RoI features before the stage-3 FCs: the reference pools
    # its 14x14 RoI features 2x2 before fc6 / fc6_mask (the mask head keeps 14x14). 1 = no pooling.
    _C.MODEL.MNC.PATHWAY_POOL = 2
    # Stage-4/5 RoIs (refined boxes) with a side shorter than this many pixels are dropped in training.
    _C.MODEL.MNC.REFINED_MIN_SIZE = 1.0

    # Stage 2: the class-agnostic mask head (MODEL.ROI_MASK_HEAD.NAME chooses it; "MNCMaskHead" is
    # the paper's FC head, "MaskRCNNConvUpsampleHead" with CLS_AGNOSTIC_MASK=True also works).
    _C.MODEL.MNC.MASK_HEAD = CN()
    # MNCMaskHead: number of 3x3 convs (each CONV_DIM channels) before the FC layers (0 = paper).
    _C.MODEL.MNC.MASK_HEAD.NUM_CONV = 0
    # MNCMaskHead: channels of those convs.
    _C.MODEL.MNC.MASK_HEAD.CONV_DIM = 256
    # MNCMaskHead: width of the hidden FC layer (the reference uses 256).
    _C.MODEL.MNC.MASK_HEAD.FC_DIM = 256
    # MNCMaskHead: side of the predicted mask, M (the reference uses 21).
    _C.MODEL.MNC.MASK_HEAD.MASK_SIZE = 21

    # End-to-end gradients through box coordinates (RoI warping by bilinear sampling of live boxes).
    _C.MODEL.MNC.BOX_GRADIENTS = CN()
    # Use the differentiable RoI warp (stages 2-5) instead of D2's RoIAlign pooler.
    _C.MODEL.MNC.BOX_GRADIENTS.ENABLED = False
    # Sampling points per bin side of the RoI warp (must be > 0: adaptive sampling is not differentiable).
    _C.MODEL.MNC.BOX_GRADIENTS.SAMPLING_RATIO = 2
    # Gradients reaching box coordinates are clipped elementwise to [-CLIP, CLIP] (0 = off); they are ~1e-5
    # on the CPU config, where 1.0 never binds and training collapsed, and 1e-6 helped (README "Ablation").
    _C.MODEL.MNC.BOX_GRADIENTS.CLIP = 1e-6

    # Segment-aware classifier (the original's second classifier trained on "segment labels").
    _C.MODEL.MNC.SEGMENT_CLASSIFIER = CN()
    # Add the classifier; when on it scores detections at test time.
    _C.MODEL.MNC.SEGMENT_CLASSIFIER.ENABLED = False
    # An RoI is foreground for it if its binarised predicted mask has IoU >= this with its GT mask.
    _C.MODEL.MNC.SEGMENT_CLASSIFIER.MASK_IOU = 0.5

    # Inference.
    _C.MODEL.MNC.TEST = CN()
    # Soft masks are binarised at this value (D2 uses 0.5).
    _C.MODEL.MNC.TEST.MASK_THRESHOLD = 0.4
    # Mask voting: each kept instance's mask becomes the score-weighted mean of the masks of all
    # same-class candidates whose box IoU with it is >= VOTING_IOU; its box is the voted mask's tight box.
    _C.MODEL.MNC.TEST.MASK_VOTING = True
    # Box IoU for a candidate to take part in a kept instance's vote.
    _C.MODEL.MNC.TEST.VOTING_IOU = 0.5

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
    return cfg
