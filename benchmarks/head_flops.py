"""FLOPs per image of an MNC config and a Mask R-CNN config at FIXED RoI and detection counts.

    python -m benchmarks.head_flops --mnc configs/mnc_R_50_FPN_1x.yaml \\
        --maskrcnn <detectron2>/model_zoo/configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \\
        [--image 800 1088] [--detections 20 50 100] [--out docs/benchmarks/r50_fpn_flops.md]

``mnc_d2.tools.analyze`` counts a model on real images, so its heads run on what the weights detect: with
random weights (no COCO-trained R50-FPN exists here) the RPN's proposals and the detections are few and
arbitrary. This script counts each part on fixed inputs instead (PyTorch's ``FlopCounterMode``, 1
multiply-add = 1 flop, D2's convention): the backbone and the RPN head on one image of ``--image`` size,
the box side on the test-time RoIs of each config (``MODEL.RPN.POST_NMS_TOPK_TEST``: MNC's cascade on
300, Mask R-CNN's box head on 1000), and the mask head that makes the output masks on D detections.
NMS, RoIAlign and pasting are not counted (no multiply-adds).
"""
import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import mnc_d2  # noqa: F401  (registers MNC)
from detectron2.modeling import build_model
from mnc_d2.config import build_cfg


def gflops(fn) -> float:
    """Multiply-adds of ``fn()`` (no grad), in G."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2 / 1e9


def _features(model, image_hw):
    """The backbone's features of one random image (3, H, W); their FLOPs are counted by the caller."""
    return model.backbone(torch.randn(1, 3, *image_hw))


def _rpn_head(model, features):
    return model.proposal_generator.rpn_head([features[f] for f in model.proposal_generator.in_features])


def _roi_input(model, num_rois: int, resolution: int) -> torch.Tensor:
    """(R, C, P, P) random RoI features of the model's FPN width."""
    channels = model.backbone.output_shape()[model.roi_heads.in_features[0]].channels
    return torch.randn(num_rois, channels, resolution, resolution)


def mnc_parts(model, num_rois: int):
    """MNC's cascade on ``num_rois`` RoIs (stage 2's mask head, both stage-3 pathways, the predictors), and the
    head of its output masks (the final head at its own resolution, else stage 2's) as a function of D."""
    heads = model.roi_heads
    res = heads.roi_pooler.output_size[0]

    def cascade():
        x = _roi_input(model, num_rois, res)
        mask_probs = heads._mask_logits(x).sigmoid()
        heads._classify(x, mask_probs)

    final = heads.final_mask_head or heads.mask_head
    final_res = heads.final_pooler.output_size[0] if heads.final_pooler is not None else res
    return gflops(cascade), lambda d: gflops(lambda: final.layers(_roi_input(model, d, final_res)))


def maskrcnn_parts(model, num_rois: int):
    """Mask R-CNN's box head + predictor on ``num_rois`` RoIs, and its mask head as a function of D."""
    heads = model.roi_heads
    box_res = heads.box_pooler.output_size[0]
    mask_res = heads.mask_pooler.output_size[0]
    box = gflops(lambda: heads.box_predictor(heads.box_head(_roi_input(model, num_rois, box_res))))
    return box, lambda d: gflops(lambda: heads.mask_head.layers(_roi_input(model, d, mask_res)))


def count(mnc_config: str, maskrcnn_config: str, image_hw, detections):
    """{"MNC" / "Mask R-CNN": {"rois", "backbone", "rpn", "box", "mask": [per D], "total": [per D]}}."""
    out = {}
    for name, config in (("MNC", mnc_config), ("Mask R-CNN", maskrcnn_config)):
        model = build_model(build_cfg(config, ["MODEL.DEVICE", "cpu"])).eval()
        rois = model.proposal_generator.post_nms_topk[False]
        features = {}
        backbone = gflops(lambda: features.update(_features(model, image_hw)))
        rpn = gflops(lambda: _rpn_head(model, features))
        box, mask_at = (mnc_parts if name == "MNC" else maskrcnn_parts)(model, rois)
        masks = [mask_at(d) for d in detections]
        out[name] = {"rois": rois, "backbone": backbone, "rpn": rpn, "box": box, "mask": masks,
                     "total": [backbone + rpn + box + m for m in masks]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnc", required=True, help="an MNC config")
    parser.add_argument("--maskrcnn", required=True, help="a Detectron2 Mask R-CNN config")
    parser.add_argument("--image", type=int, nargs=2, default=(800, 1088), metavar=("H", "W"))
    parser.add_argument("--detections", type=int, nargs="+", default=(20, 50, 100))
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    counts = count(args.mnc, args.maskrcnn, args.image, args.detections)
    ds = args.detections
    lines = [f"FLOPs per image (G, 1 multiply-add = 1 flop), {args.image[0]}x{args.image[1]} input, "
             f"`python -m benchmarks.head_flops --mnc {args.mnc} --maskrcnn {args.maskrcnn.split('configs/')[-1]}`",
             "", "| model | backbone + FPN | RPN head | box side (RoIs) | "
             + " | ".join(f"mask head, D={d}" for d in ds) + " | " + " | ".join(f"total, D={d}" for d in ds) + " |",
             "|---" * (4 + 2 * len(ds)) + "|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {c['backbone']:.2f} | {c['rpn']:.2f} | {c['box']:.2f} ({c['rois']}) | "
                     + " | ".join(f"{m:.2f}" for m in c["mask"]) + " | " + " | ".join(f"{t:.2f}" for t in c["total"]) + " |")
    ratios = [a / b for a, b in zip(counts["MNC"]["total"], counts["Mask R-CNN"]["total"])]
    lines += ["", "MNC ÷ Mask R-CNN: " + ", ".join(f"{r:.3f} at D={d}" for r, d in zip(ratios, ds))]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
