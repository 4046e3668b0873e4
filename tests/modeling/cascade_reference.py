"""Reference outputs of the MNC cascade, to show that a restructuring of ``mnc_d2/modeling`` leaves the
model's behaviour unchanged (issue "The cascade, rebuilt", part 0).

    python tests/modeling/cascade_reference.py      # (re)writes tests/data/cascade_reference.pt from the current code

Every case pins each switch it depends on explicitly, so a later change of a DEFAULT does not change
the case. Only public entry points are used (``build_model``, ``model(inputs)``,
``model.inference(do_postprocess=False)``), so the same function runs on the code before and after.
"""
import os
import sys
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import make_targets, small_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

REFERENCE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "cascade_reference.pt")
IMAGE_SIZE = (200, 250)
# today's behaviour of every switch the restructuring must keep
PINNED = ("MODEL.MNC.MASK_HEAD.NUM_CONV", 1, "MODEL.MNC.TEST.MASK_VOTING", True,
          "MODEL.MNC.BOX_GRADIENTS.CLIP", 1e-6, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
          "MODEL.MNC.SEGMENT_CLASSIFIER.ENABLED", False, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 60,
          "MODEL.RPN.POST_NMS_TOPK_TEST", 40)
CASES = {
    "3stage": ("MODEL.MNC.NUM_STAGES", 3),
    "5stage": ("MODEL.MNC.NUM_STAGES", 5),
    "3stage_box_gradients": ("MODEL.MNC.NUM_STAGES", 3, "MODEL.MNC.BOX_GRADIENTS.ENABLED", True),
    "5stage_box_gradients": ("MODEL.MNC.NUM_STAGES", 5, "MODEL.MNC.BOX_GRADIENTS.ENABLED", True),
    # gating was implied by the classifier before it became a switch; IoU 0: every foreground RoI is a
    # positive segment under the old and the new (whole-GT) segment IoU alike
    "5stage_segment_classifier": ("MODEL.MNC.NUM_STAGES", 5, "MODEL.MNC.SEGMENT_CLASSIFIER.ENABLED", True,
                                  "MODEL.MNC.SEGMENT_CLASSIFIER.MASK_IOU", 0.0, "MODEL.MNC.SEGMENT_GATING", True),
}
# output key -> module (the stage-3 pathways were called box_head / seg_head before the restructuring)
MODULES = {"backbone": "backbone", "proposal_generator": "proposal_generator", "roi_heads.mask_head": "roi_heads.mask_head",
           "roi_heads.box_head": "roi_heads.box_pathway", "roi_heads.seg_head": "roi_heads.segment_pathway",
           "roi_heads.box_predictor": "roi_heads.box_predictor"}


def _inputs():
    g = torch.Generator().manual_seed(0)
    boxes = ((0, 0, 250, 200), (10, 5, 240, 190), (30, 40, 120, 150))
    return [{"image": (torch.rand((3, *IMAGE_SIZE), generator=g) * 255).float(),
             "instances": make_targets(IMAGE_SIZE, boxes=boxes, classes=(1, 2, 4))} for _ in range(2)]


def cascade_outputs(case: str) -> Dict[str, torch.Tensor]:
    """Losses, per-module gradient sums, raw candidates and post-processed detections of one case."""
    cfg = small_cfg(*PINNED, *CASES[case])
    torch.manual_seed(0)
    model = build_model(cfg)
    out = {}
    model.train()
    with EventStorage():
        torch.manual_seed(1)
        losses = model(_inputs())
        sum(losses.values()).backward()
    out.update({f"loss/{k}": v.detach() for k, v in losses.items()})
    for name, path in MODULES.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:  # the code before the restructuring
            module = model.get_submodule(name)
        out[f"grad/{name}"] = torch.stack([p.grad.abs().sum() for p in module.parameters() if p.grad is not None]
                                          ).sum() if any(p.grad is not None for p in module.parameters()) \
            else torch.zeros(())
    model.eval()
    images = [{"image": x["image"]} for x in _inputs()]
    with torch.no_grad():
        raw = model.inference(images, do_postprocess=False)
        final = model(images)
    for i, (r, f) in enumerate(zip(raw, final)):
        order = torch.argsort(r.scores * 1e4 + r.pred_classes.float() + r.pred_boxes.tensor.sum(1) * 1e-6)
        out[f"raw{i}/boxes"] = r.pred_boxes.tensor[order]
        out[f"raw{i}/scores"] = r.scores[order]
        out[f"raw{i}/classes"] = r.pred_classes[order]
        out[f"raw{i}/mask_boxes"] = r.mask_boxes.tensor[order]
        out[f"raw{i}/mask_sums"] = r.pred_masks.flatten(1).sum(1)[order]
        out[f"raw{i}/kept"] = (r.kept_rank >= 0)[order]
        inst = f["instances"]
        out[f"final{i}/boxes"] = inst.pred_boxes.tensor
        out[f"final{i}/scores"] = inst.scores
        out[f"final{i}/classes"] = inst.pred_classes
        out[f"final{i}/mask_areas"] = inst.pred_masks.flatten(1).sum(1)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.makedirs(os.path.dirname(REFERENCE_FILE), exist_ok=True)
    torch.save({case: cascade_outputs(case) for case in CASES}, REFERENCE_FILE)
    print(f"wrote {REFERENCE_FILE}")
