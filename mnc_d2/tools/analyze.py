"""FLOPs and parameters of an MNC (or any Detectron2) model, as D2's ``tools/analyze_model.py`` counts them::

    python -m mnc_d2.tools.analyze --config-file configs/mnc_R18_GN_FPN_shapes_cpu.yaml --tasks flop parameter \\
        [--num-inputs 10] [MODEL.WEIGHTS output/.../model_final.pth] [other config opts]

FLOPs come from PyTorch's dispatch-level ``FlopCounterMode`` (every op that actually ran, eager; 1
multiply-add = 1 flop, D2's convention), averaged over the first ``--num-inputs`` images of
``DATASETS.TEST[0]`` at test-time input size, per module. D2's ``tools/analyze_model.py`` counts a traced
graph with fvcore, whose per-module split puts most of D2's convs under the top module; its totals agree with
these on MNC and Mask R-CNN (``tests/tools/test_analyze.py`` checks it to 5 %). A detector's head cost depends on
what it runs on (300 RoIs, the detections), so give trained weights: random ones detect little and the mask
heads then run on few boxes.
"""
import argparse
import logging
import sys
from collections import OrderedDict
from typing import Dict, List

import torch

__all__ = ["count_flops", "main"]

logger = logging.getLogger("mnc_d2.analyze")

# module-name prefixes reported separately, in this order (the rest is summed under "other")
PARTS = ("backbone", "proposal_generator", "roi_heads")


def _part(name: str, depth: int) -> str:
    """'roi_heads.mask_head.fc' -> 'roi_heads.mask_head' at depth 2; '' (the model) -> 'other'."""
    parts = name.split(".")
    if not name or parts[0] not in PARTS:
        return "other"
    return ".".join(parts[:depth])


def _eager_by_part(model, inputs, depth: int) -> Dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(inputs)
    out: Dict[str, float] = OrderedDict()
    root = type(model).__name__
    counts = counter.get_flop_counts()
    names = [n for n in counts if n.startswith(root + ".")]
    for name in names:
        short = name[len(root) + 1:]
        if not any(other.startswith(name + ".") for other in names):
            total = sum(counts[name].values()) / 2  # FlopCounterMode: 2 per multiply-add
            out[_part(short, depth)] = out.get(_part(short, depth), 0.0) + total
    out["total"] = counter.get_total_flops() / 2
    leaves = sum(v for k, v in out.items() if k != "total")
    if out["total"] > leaves:
        out["other"] = out.get("other", 0.0) + out["total"] - leaves
    return out


def count_flops(model, inputs: List[dict], depth: int = 2) -> Dict:
    """Mean FLOPs per image: {"by_part": {part: flops}, "eager_total", "detections": mean number of output
    instances}. ``inputs``: D2 test-loader dicts, one image each."""
    model.eval()
    by_part: Dict[str, float] = OrderedDict()
    eager = detections = 0.0
    with torch.no_grad():
        for inp in inputs:
            one = [{k: inp[k] for k in ("image", "height", "width") if k in inp}]
            parts = _eager_by_part(model, one, depth)
            eager += parts.pop("total")
            for part, value in parts.items():
                by_part[part] = by_part.get(part, 0.0) + value
            detections += len(model(one)[0]["instances"])
    n = max(1, len(inputs))
    return {"by_part": OrderedDict((k, v / n) for k, v in by_part.items()), "eager_total": eager / n,
            "detections": detections / n, "num_inputs": len(inputs)}


def format_flops(result: Dict) -> str:
    from tabulate import tabulate

    rows = [(part, f"{value / 1e9:.3f}") for part, value in result["by_part"].items()]
    rows.append(("total", f"{result['eager_total'] / 1e9:.3f}"))
    lines = [f"GFLOPs per image (1 multiply-add = 1 flop), mean over {result['num_inputs']} images, "
             f"{result['detections']:.1f} detections per image:",
             tabulate(rows, headers=["module", "GFLOPs"], tablefmt="pipe")]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--tasks", nargs="+", choices=["flop", "parameter"], default=["flop", "parameter"])
    parser.add_argument("--num-inputs", type=int, default=10, help="images of DATASETS.TEST[0] to average over")
    parser.add_argument("--depth", type=int, default=2, help="module-name depth of the FLOP table")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="count a randomly initialised model when MODEL.WEIGHTS is empty (its heads then run on "
                             "whatever it detects)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config options, KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.num_inputs < 1:
        parser.error("--num-inputs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import mnc_d2  # noqa: F401  (registers the model parts and datasets)
    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger
    from fvcore.nn import parameter_count_table

    from ..config import build_cfg
    from ..utils.errors import MNCError
    from ..engine.defaults import load_weights

    setup_logger(name="mnc_d2")
    try:
        cfg = build_cfg(args.config_file, args.opts)
        model = build_model(cfg)
        load_weights(model, cfg.MODEL.WEIGHTS, allow_untrained=args.allow_untrained)
    except MNCError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    model.eval()
    if "parameter" in args.tasks:
        print(parameter_count_table(model, max_depth=3))
    if "flop" in args.tasks:
        if not cfg.DATASETS.TEST:
            print("ERROR: DATASETS.TEST is empty: the FLOP count needs test images", file=sys.stderr)
            return 2
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
        inputs = []
        for batch in loader:
            inputs.extend(batch)
            if len(inputs) >= args.num_inputs:
                break
        print(format_flops(count_flops(model, inputs[:args.num_inputs], args.depth)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
