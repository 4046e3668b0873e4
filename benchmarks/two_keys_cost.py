"""What the two keys cost at Detectron2's own settings: D2's zoo Mask R-CNN R50-FPN file, and the same file plus
``MODEL.META_ARCHITECTURE MNC MODEL.ROI_HEADS.NAME MNCROIHeads``, measured side by side in one invocation.

    python -m benchmarks.two_keys_cost --out docs/benchmarks/two_keys [--test-proposals 1000 300]

Both models: random initialisation (the last norm of each residual branch zeroed, so that a deep random ResNet
gives finite features), 800 px test size (the zoo file's), the zoo file's 1000 test proposals (``--test-proposals``
adds MNC at other counts) and 512 RoIs per image in training, detections fixed at 100 per image (score threshold 0)
so that both paste the same number of masks. Images: the first ``--images`` of the shapes val split, resized by the
zoo file's test transform (shorter side 800); training uses the shapes train split at the zoo file's train sizes.

Measured, as ratios against Mask R-CNN of the same run:
- FLOPs per image: ``mnc_d2.tools.analyze.count_flops`` (1 multiply-add = 1 flop);
- CPU inference s/image at each ``--threads``: ``--rounds`` interleaved rounds (MR, MNC, MR, MNC, ...), each the mean
  over the images after one untimed call; the ratio of the per-round medians, with the range of per-round ratios;
- training s/iter (batch ``--batch``, SGD step included) at the largest thread count, interleaved the same way.
The proposals reaching the ROI heads and the detections per image are counted on the timed images.
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

R50_FPN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
SWITCH = ["MODEL.META_ARCHITECTURE", "MNC", "MODEL.ROI_HEADS.NAME", "MNCROIHeads"]
COMMON = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "5",
          "DATASETS.TRAIN", "('mnc_shapes_train',)", "DATASETS.TEST", "('mnc_shapes_val',)", "INPUT.MASK_FORMAT", "bitmask",
          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "100", "DATALOADER.NUM_WORKERS", "0"]


def build(opts: List[str], seed: int):
    from detectron2 import model_zoo
    from detectron2.modeling import build_model
    from mnc_d2.config import build_cfg

    cfg = build_cfg(model_zoo.get_config_file(R50_FPN), COMMON + opts)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, module in model.backbone.named_modules():
            if name.endswith("conv3.norm"):  # zero-init residual (see the module docstring)
                module.weight.zero_()
    return cfg, model


def count_roi_inputs(model, inputs) -> Dict[str, float]:
    """Mean proposals reaching the ROI heads and detections per image, over ``inputs`` (one image a call)."""
    seen = []
    handle = model.roi_heads.register_forward_pre_hook(lambda m, args: seen.append(len(args[2][0])))
    try:
        with torch.no_grad():
            detections = [len(model([x])[0]["instances"]) for x in inputs]
    finally:
        handle.remove()
    return {"proposals": statistics.mean(seen), "detections": statistics.mean(detections)}


def time_inference(model, inputs) -> float:
    with torch.no_grad():
        model([inputs[0]])  # untimed
        start = time.perf_counter()
        for x in inputs:
            model([x])
        return (time.perf_counter() - start) / len(inputs)


def time_training(model, batches, steps: int) -> float:
    from detectron2.utils.events import EventStorage

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    with EventStorage():
        for i in range(steps + 1):
            start = time.perf_counter()
            losses = model(batches[i % len(batches)])
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:  # the first step is untimed
                times.append(time.perf_counter() - start)
    model.eval()
    return statistics.mean(times)


def interleaved(fns: Dict[str, callable], rounds: int) -> Dict[str, List[float]]:
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def ratios(times: Dict[str, List[float]], base: str = "maskrcnn") -> Dict[str, Dict]:
    out = {}
    for name, values in times.items():
        per_round = [v / b for v, b in zip(values, times[base])]
        out[name] = {"s": statistics.median(values), "ratio": statistics.median(values) / statistics.median(times[base]),
                     "ratio_range": [min(per_round), max(per_round)], "rounds": values}
    return out


def train_batches(cfg, batch: int, count: int):
    from detectron2.data import DatasetCatalog, DatasetMapper

    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    mapper = DatasetMapper(cfg, is_train=True)
    items = [mapper(d) for d in dicts[: batch * count]]
    return [items[i * batch:(i + 1) * batch] for i in range(count)]


def markdown(result: Dict, command: str) -> str:
    lines = ["# What the two keys cost at Detectron2's settings", "",
             f"Generated by `{command}`; raw numbers in `results.json`.", "",
             "D2's zoo `mask_rcnn_R_50_FPN_1x.yaml` (Mask R-CNN) against the same file plus "
             "`MODEL.META_ARCHITECTURE MNC MODEL.ROI_HEADS.NAME MNCROIHeads`, random weights, "
             f"{result['size']} px images (shorter side) of the "
             f"shapes val split, 100 detections per image, {result['threads_note']}. Ratios are MNC ÷ Mask R-CNN from "
             "this one invocation; ranges are the lowest and highest per-round ratio.", "",
             "| model | test proposals (reaching the ROI heads) | detections | GFLOPs/img (× MR) | "
             + " | ".join(f"inference s/img, {t} thread{'s' if t > 1 else ''} (× MR, range)" for t in result["threads"])
             + f" | train s/iter, {max(result['threads'])} threads (× MR, range) |",
             "|---|---:|---:|---:|" + "---:|" * len(result["threads"]) + "---:|"]
    for name, m in result["models"].items():
        cells = [m["label"], f"{m['test_proposals']} ({m['proposals']:.0f})", f"{m['detections']:.0f}",
                 f"{m['gflops']:.1f} ({m['gflops'] / result['models']['maskrcnn']['gflops']:.2f})"]
        for t in result["threads"]:
            r = result["inference"][str(t)][name]
            cells.append(f"{r['s']:.2f} ({r['ratio']:.2f}, {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})")
        r = result["training"].get(name)
        cells.append(f"{r['s']:.2f} ({r['ratio']:.2f}, {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})" if r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Targets: FLOPs ≤ {result['targets']['flops']}×, inference ≤ {result['targets']['inference']}× "
              f"at every thread count, training ≤ {result['targets']['train']}× Mask R-CNN's."]
    for name, m in result["models"].items():
        if name == "maskrcnn":
            continue
        verdicts = [("FLOPs", m["gflops"] / result["models"]["maskrcnn"]["gflops"], None, result["targets"]["flops"])]
        verdicts += [(f"inference at {t} thread(s)", result["inference"][str(t)][name]["ratio"],
                      result["inference"][str(t)][name]["ratio_range"], result["targets"]["inference"])
                     for t in result["threads"]]
        if name in result["training"]:
            verdicts.append(("training", result["training"][name]["ratio"], result["training"][name]["ratio_range"],
                             result["targets"]["train"]))
        lines.append(f"- {m['label']}: " + "; ".join(
            f"{what} {v:.2f}× ({'meets' if v <= t else 'misses'} ≤ {t}×"
            + (f"; rounds up to {r[1]:.2f}×" if r and r[1] > t else "") + ")" for what, v, r, t in verdicts) + ".")
    lines += ["", "A verdict compares the median over the rounds; where a single round was above the target, it says so."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for README.md and results.json")
    parser.add_argument("--test-proposals", type=int, nargs="+", default=[1000],
                        help="MNC's RPN.POST_NMS_TOPK_TEST values measured (Mask R-CNN keeps the zoo file's 1000)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=3, help="timed images per round")
    parser.add_argument("--flop-images", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps per round (after 1 untimed)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=800, help="test and train shorter side (the zoo file's: 800)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target-flops", type=float, default=1.2)
    parser.add_argument("--target-inference", type=float, default=1.15)
    parser.add_argument("--target-train", type=float, default=1.2)
    parser.add_argument("--render", action="store_true", help="only rewrite README.md from --out's results.json")
    args = parser.parse_args(argv)
    if args.render:
        with open(os.path.join(args.out, "results.json")) as f:
            result = json.load(f)
        with open(os.path.join(args.out, "README.md"), "w") as f:
            f.write(markdown(result, result["command"]))
        return 0

    import mnc_d2  # noqa: F401  (registers MNC and the datasets)
    from detectron2.data import DatasetCatalog, DatasetMapper
    from mnc_d2.tools.analyze import count_flops

    size_opts = [] if args.size == 800 else ["INPUT.MIN_SIZE_TEST", str(args.size), "INPUT.MIN_SIZE_TRAIN",
                                              f"({args.size},)"]
    specs = {"maskrcnn": ("Mask R-CNN (zoo file)", [], 1000)}
    for n in args.test_proposals:
        specs[f"mnc_{n}"] = (f"MNC (zoo file + two keys{'' if n == 1000 else f', {n} test proposals'})",
                             SWITCH + ["MODEL.RPN.POST_NMS_TOPK_TEST", str(n)], n)
    models, result = {}, {"models": {}, "threads": args.threads, "inference": {}, "training": {},
                          "targets": {"flops": args.target_flops, "inference": args.target_inference,
                                      "train": args.target_train},
                          "size": args.size, "threads_note": f"{args.rounds} interleaved rounds of {args.images} images",
                          "torch": torch.__version__, "cpus": os.cpu_count()}
    torch.set_num_threads(max(args.threads))
    for name, (label, opts, proposals) in specs.items():
        cfg, model = build(size_opts + opts, args.seed)
        model.eval()
        models[name] = model
        if "inputs" not in result:
            dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[: max(args.images, args.flop_images)]
            mapper = DatasetMapper(cfg, is_train=False)
            inputs = [mapper(d) for d in dicts]
            batches = train_batches(cfg, args.batch, 2)
            result["inputs"] = [list(x["image"].shape[1:]) for x in inputs]
        flops = count_flops(model, inputs[: args.flop_images])
        result["models"][name] = {"label": label, "test_proposals": proposals, "gflops": flops["eager_total"] / 1e9,
                                  **count_roi_inputs(model, inputs[: args.images])}
        print(name, result["models"][name], flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = interleaved({n: (lambda m=m: time_inference(m, inputs[: args.images])) for n, m in models.items()},
                            args.rounds)
        result["inference"][str(threads)] = ratios(times)
        print("inference", threads, {n: round(r["ratio"], 3) for n, r in result["inference"][str(threads)].items()},
              flush=True)
    torch.set_num_threads(max(args.threads))
    train_models = {n: m for n, m in models.items() if n in ("maskrcnn", "mnc_1000")}
    times = interleaved({n: (lambda m=m: time_training(m, batches, args.train_steps)) for n, m in train_models.items()},
                        args.rounds)
    result["training"] = ratios(times)
    print("training", {n: round(r["ratio"], 3) for n, r in result["training"].items()}, flush=True)

    os.makedirs(args.out, exist_ok=True)
    command = "python -m benchmarks.two_keys_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = command
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
