#!/usr/bin/env python
"""Where MNC's inference time goes: milliseconds per image in each part of the model, at batch 1.

    python -m benchmarks.profile_inference --config-file configs/mnc_R18_GN_FPN_shapes_cpu.yaml \\
        --weights output/mnc_R18_GN_FPN_shapes_cpu/model_final.pth
    python -m benchmarks.profile_inference ... --slow-paths    # F.max_pool2d instead of the strided max (before)

Times ``model([image])`` in eval mode under ``torch.no_grad()`` on the first ``--images`` test images
(after ``--warmup`` untimed calls) and, inside it, the backbone, the RPN, the RoI pooler, the mask head,
stage 2 and stage 3, the candidate selection and the image-space post-processing (pasting / voting).
Parts nest: stage 2 contains the pooler and the mask head; the ROI heads contain stages 2 and 3.
``--slow-paths`` switches off this project's inference speed-up (a strided max instead of ``max_pool2d``
before the stage-3 pathways, used with ``MODEL.MNC.PATHWAY_POOL`` > 1) to measure its before/after on the
same weights. (A threaded CPU RoI pooler was removed: it made the whole model slower, docs/results.md.)
"""
import argparse
import collections
import statistics
import sys
import time
from typing import Callable, Dict, List


def _timed(fn: Callable, label: str, acc: Dict[str, List[float]]) -> Callable:
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[label].append(time.perf_counter() - t0)
        return out

    return wrapped


def instrument(model, acc: Dict[str, List[float]]) -> Callable[[], None]:
    """Wrap the parts of an MNC model (and D2's GeneralizedRCNN, where they exist) in timers; returns
    the undo of the one module-level patch (MNC's post-processing function)."""
    import mnc_d2.modeling.meta_arch as meta_arch

    model.backbone.forward = _timed(model.backbone.forward, "backbone", acc)
    model.proposal_generator.forward = _timed(model.proposal_generator.forward, "rpn", acc)
    heads = model.roi_heads
    heads.forward = _timed(heads.forward, "roi_heads", acc)
    for attr, label in (("_roi_features", "roi_heads.stage2.roi_pooler"), ("_mask_logits", "roi_heads.stage2.mask_head"),
                        ("_classify", "roi_heads.stage3"), ("_candidates", "roi_heads.candidates")):
        if hasattr(heads, attr):
            setattr(heads, attr, _timed(getattr(heads, attr), label, acc))
    saved = meta_arch.mnc_postprocess
    meta_arch.mnc_postprocess = _timed(saved, "postprocess", acc)

    def undo():
        meta_arch.mnc_postprocess = saved

    return undo


def use_slow_paths() -> Callable[[], None]:
    """F.max_pool2d, as before the speed-up; returns the undo."""
    import torch.nn.functional as F

    import mnc_d2.modeling.roi_heads as roi_heads

    saved = roi_heads.max_pool_square
    roi_heads.max_pool_square = lambda x, k: F.max_pool2d(x, k) if k > 1 else x

    def undo():
        roi_heads.max_pool_square = saved

    return undo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="trained weights (MODEL.WEIGHTS)")
    parser.add_argument("--dataset", help="test dataset (default: the config's first DATASETS.TEST)")
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--slow-paths", action="store_true", help="D2's pooler and max_pool2d (before)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config pairs")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import mnc_d2  # noqa: F401  (registers datasets and model parts)
    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model

    from mnc_d2.config import build_cfg
    from mnc_d2.engine import load_weights_for_eval

    cfg = build_cfg(args.config_file, [*args.opts, "MODEL.WEIGHTS", args.weights])
    model = build_model(cfg)
    load_weights_for_eval(cfg, model)
    model.eval()
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    inputs = []
    for batch in build_detection_test_loader(cfg, dataset):
        inputs.extend(batch)
        if len(inputs) >= args.images + args.warmup:
            break
    acc: Dict[str, List[float]] = collections.defaultdict(list)
    undo = [use_slow_paths()] if args.slow_paths else []
    undo.append(instrument(model, acc))
    totals = []
    try:
        with torch.no_grad():
            for inp in inputs[:args.warmup]:
                model([inp])
            acc.clear()
            for inp in inputs[args.warmup:]:
                t0 = time.perf_counter()
                model([inp])
                totals.append(time.perf_counter() - t0)
    finally:
        for fn in undo:
            fn()
    n = len(totals)
    print(f"{cfg.MODEL.META_ARCHITECTURE} on {dataset}, {n} images, {torch.get_num_threads()} threads"
          f"{', slow paths (before)' if args.slow_paths else ''}")
    print(f"{'model([image])':32s} median {1000 * statistics.median(totals):7.1f} ms   mean {1000 * statistics.fmean(totals):7.1f} ms")
    for label in sorted(acc, key=lambda k: ("backbone rpn roi_heads postprocess".find(k.split(".")[0]), k)):
        print(f"  {label:30s} mean {1000 * sum(acc[label]) / n:7.1f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
