"""The benchmark's outputs: ratios to the baseline, pass/fail against the targets, and the JSON file,
markdown table and PNG figure written from them. Pure functions of the per-model results of
``worker.py``; no Detectron2 import, so reports can be rebuilt from a saved ``benchmark.json``::

    python -m benchmarks.report benchmarks/results/shapes/benchmark.json
"""
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional

BASELINE = "maskrcnn"
TARGET_MODEL = "mnc3"  # the issue's targets are stated for MNC three-stage; other models get them for information
# name -> (description, comparison, limit): the ratio (or difference) MNC vs the baseline, measured in one run
TARGETS = {
    "inference_time_ratio": ("inference s/image (batch 1) ÷ Mask R-CNN's, this round", "<=", 1.25),
    "inference_time_ratio_long_term": ("inference s/image (batch 1) ÷ Mask R-CNN's, long term", "<=", 1.10),
    "train_time_ratio": ("training s/iteration ÷ Mask R-CNN's", "<=", 1.20),
    "memory_ratio": ("peak memory ÷ Mask R-CNN's", "<=", 1.15),
    "segm_ap_diff": ("mask AP − Mask R-CNN's (AP points)", ">=", 0.0),
}
JUDGED_TARGETS = {k: v for k, v in TARGETS.items() if "time" not in k}  # judged on a training run
# a target measured by another target's value
_VALUE_OF = {"inference_time_ratio_long_term": "inference_time_ratio"}
RESULT_FILES = {"json": "benchmark.json", "markdown": "benchmark.md", "figure": "benchmark.png"}


# ------------------------------------------------------------------------------------ accessors
def _ok(result: Optional[Dict]) -> bool:
    return bool(result) and result.get("status") == "ok"


def failure_cell(result: Dict) -> str:
    """A run that did not finish, in a few words for a table: "diverged at iteration N" (NaN/Inf), else its
    status and the first sentence of its message, cut at 80 characters (the json keeps the whole message)."""
    message = result.get("message") or ""
    diverged = re.search(r"training failed at iteration (\d+)", message)
    if diverged and any(word in message for word in ("Non-finite", "diverged", "Inf/NaN")):
        return f"diverged at iteration {diverged.group(1)}"
    first = message.split(". ")[0]
    return result.get("status", "?") + (f" ({first[:80]}{'...' if len(first) > 80 else ''})" if first else "")


def train_s_per_iter(result: Dict) -> Optional[float]:
    return result["train"]["s_per_iter"]["median"] if _ok(result) else None


def train_cpu_s_per_iter(result: Dict) -> Optional[float]:
    return result["train"]["cpu_s_per_iter"]["median"] if _ok(result) else None


def inference_s_per_image(result: Dict) -> Optional[float]:
    return result["inference"]["s_per_image"]["median"] if _ok(result) else None


def peak_memory_mb(result: Dict) -> Optional[float]:
    """The larger of the training and inference peaks (the training one, in practice)."""
    if not _ok(result):
        return None
    peaks = [result["memory"].get(k) for k in ("train_peak_mb", "inference_peak_mb")]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def gflops_per_image(result: Dict) -> Optional[float]:
    """Mean GFLOPs per val image on the final weights (mnc_d2.analyze's eager count; 1 multiply-add = 1)."""
    if not _ok(result) or not result.get("flops"):
        return None
    return result["flops"]["eager_total"] / 1e9


def final_ap(result: Dict, task: str = "segm", key: str = "AP") -> Optional[float]:
    if not _ok(result):
        return None
    return result["eval"]["final"].get(task, {}).get(key)


def _missing(value: Optional[float]) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if _missing(a) or _missing(b) or b <= 0:
        return None
    return round(a / b, 3)


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if _missing(a) or _missing(b) else round(a - b, 3)


# ------------------------------------------------------------------------------------ comparison
def compare(models: Dict[str, Dict], baseline: str = BASELINE) -> Dict[str, Dict]:
    """Per non-baseline model: ratios to the baseline and pass/fail (None = not measurable) per target."""
    base = models.get(baseline)
    out = {}
    for name, result in models.items():
        if name == baseline or not _ok(result) or not _ok(base):
            continue
        values = {
            "train_time_ratio": _ratio(train_s_per_iter(result), train_s_per_iter(base)),
            "train_cpu_time_ratio": _ratio(train_cpu_s_per_iter(result), train_cpu_s_per_iter(base)),
            "inference_time_ratio": _ratio(inference_s_per_image(result), inference_s_per_image(base)),
            "memory_ratio": _ratio(peak_memory_mb(result), peak_memory_mb(base)),
            "flops_ratio": _ratio(gflops_per_image(result), gflops_per_image(base)),
            "segm_ap_diff": _diff(final_ap(result, "segm"), final_ap(base, "segm")),
            "bbox_ap_diff": _diff(final_ap(result, "bbox"), final_ap(base, "bbox")),
        }
        passed = {}  # time targets are judged on quiet --time-only invocations only (timing.md), not here
        for target, (_, op, limit) in JUDGED_TARGETS.items():
            value = values[_VALUE_OF.get(target, target)]
            passed[target] = None if value is None else (value <= limit if op == "<=" else value >= limit)
        values["pass"] = passed
        values["all_pass"] = all(passed.values()) if all(p is not None for p in passed.values()) else None
        out[name] = values
    return out


# ------------------------------------------------------------------------------------ JSON
def _finite(obj):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build_report(meta: Dict, models: Dict[str, Dict]) -> Dict:
    return _finite({
        "benchmark": meta,
        "targets": {k: {"description": d, "op": op, "limit": limit, "model": TARGET_MODEL}
                    for k, (d, op, limit) in JUDGED_TARGETS.items()},
        "baseline": BASELINE,
        "models": models,
        "comparison": compare(models),
    })


# ------------------------------------------------------------------------------------ markdown
def _fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _verdict(passed: Optional[bool]) -> str:
    return "n/a" if passed is None else ("**PASS**" if passed else "**FAIL**")


def markdown(report: Dict) -> str:
    meta, models, comparison = report["benchmark"], report["models"], report["comparison"]
    lines = [f"# MNC vs Detectron2 Mask R-CNN: `{meta['dataset']}` ({meta['size']} size)", ""]
    lines.append(
        f"One run of `{meta['command']}` on {meta['host']['device_name']} ({meta['threads']} threads), "
        f"{meta['started']}. Every model: {meta['backbone']}, trained for {meta['iters']} iterations "
        f"× {meta['ims_per_batch']} images on `{meta['train_dataset']}`, evaluated on `{meta['val_dataset']}` "
        f"({meta['num_val_images']} images) every {meta['eval_period']} iterations, seed {meta['seed']}; "
        f"git {meta['git']}."
    )
    lines += ["", "| model | train s/iter | ÷ MR | infer s/img | ÷ MR | GFLOPs/img | ÷ MR | peak MB | ÷ MR | segm AP "
              "| AP50 | AP75 | bbox AP | Δ segm AP |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in models.items():
        title = f"{result.get('label', name)} (`{name}`)"
        if not _ok(result):
            lines.append(f"| {title} | {result.get('status', '?')}: {result.get('message', '')} |" + " |" * 13)
            continue
        cmp_ = comparison.get(name, {})
        is_base = name == report["baseline"]
        one = "1.00" if is_base else None
        lines.append("| " + " | ".join([
            title,
            _fmt(train_s_per_iter(result)), one or _fmt(cmp_.get("train_time_ratio"), ".2f"),
            _fmt(inference_s_per_image(result)), one or _fmt(cmp_.get("inference_time_ratio"), ".2f"),
            _fmt(gflops_per_image(result), ".2f"), one or _fmt(cmp_.get("flops_ratio"), ".2f"),
            _fmt(peak_memory_mb(result), ".0f"), one or _fmt(cmp_.get("memory_ratio"), ".2f"),
            _fmt(final_ap(result, "segm"), ".1f"), _fmt(final_ap(result, "segm", "AP50"), ".1f"),
            _fmt(final_ap(result, "segm", "AP75"), ".1f"), _fmt(final_ap(result, "bbox"), ".1f"),
            "0.0" if is_base else _fmt(cmp_.get("segm_ap_diff"), "+.1f"),
        ]) + " |")
    reused = [f"`{n}` (git {r.get('git', 'not recorded')})" for n, r in models.items() if r.get("reused")]
    if reused:
        lines += ["", "Reused with `--resume` from an earlier invocation with the same spec: " + ", ".join(reused)
                  + ". Their times were measured in that invocation, on the same machine."]
    lines += ["", "÷ MR: ratio to Mask R-CNN measured in this run. Times are medians after warm-up (training: "
              "one `run_step` = data + forward + backward + update, evaluation excluded; inference: "
              "`model([image])` in eval mode, mask pasting included). GFLOPs/img: `mnc_d2.tools.analyze`'s count on the "
              "first val images with the final weights (every op that ran, heads on the RoIs and detections they "
              "really ran on; 1 multiply-add = 1 flop), independent of machine load. Peak MB: "
              f"{_memory_phrase(models)}. AP: COCO AP (0-100) after the last iteration.", ""]

    if comparison:
        names = list(comparison)
        lines += target_lines(report["targets"], comparison)
        cpu = [f"`{n}` {_fmt(comparison[n].get('train_cpu_time_ratio'), '.2f', '×')}" for n in names]
        lines += ["", "Training CPU-time ratio (process CPU seconds per iteration, less sensitive to other load "
                  "on a shared machine): " + ", ".join(cpu) + "."]
    elif report["baseline"] not in models:
        lines += ["No Mask R-CNN in this run (`--models` without `maskrcnn`): no ratios or targets."]

    curves = {n: r["eval"]["curve"] for n, r in models.items() if _ok(r) and r["eval"]["curve"]}
    if curves:
        iters = sorted({point["iter"] for curve in curves.values() for point in curve})
        lines += ["", "## Learning curve (segm AP / bbox AP)", "", "| iteration | " + " | ".join(
            f"`{n}`" for n in curves) + " |", "|---:|" + "---:|" * len(curves)]
        for it in iters:
            cells = []
            for curve in curves.values():
                point = next((p for p in curve if p["iter"] == it), None)
                if point is None:
                    cells.append("–")
                    continue
                segm, bbox = point.get("segm", {}).get("AP"), point.get("bbox", {}).get("AP")
                cells.append(f"{_fmt(segm, '.1f')} / {_fmt(bbox, '.1f')}"
                             + (" (no detections)" if point.get("no_predictions") else ""))
            lines.append(f"| {it} | " + " | ".join(cells) + " |")
    lines += _variant_lines(models, report["baseline"])
    lines += _profile_lines(models)
    lines += ["", f"Figure: `{RESULT_FILES['figure']}`; raw numbers: `{RESULT_FILES['json']}`.", ""]
    return "\n".join(lines)


def target_lines(targets: Dict[str, Dict], comparison: Dict[str, Dict]) -> List[str]:
    """The "Targets" table: each target's value and verdict per compared model."""
    names = list(comparison)
    lines = ["## Targets", "", "Time targets are judged only on a quiet `--time-only` invocation (`timing.md`): the "
             "training runs' times, above, may share the cores with other runs.", "",
             "| target | limit | " + " | ".join(
        f"`{n}`" + (" (target model)" if n == TARGET_MODEL else "") for n in names) + " |",
        "|---|---|" + "---|" * len(names)]
    for target, info in targets.items():
        if "time" in target:  # aggregates written before time targets left the training runs' reports
            continue
        cells = []
        for n in names:
            value = comparison[n].get(_VALUE_OF.get(target, target))
            shown = _fmt(value, "+.1f") if target.endswith("diff") else _fmt(value, ".2f", "×")
            cells.append(f"{shown} {_verdict(comparison[n]['pass'].get(target))}")
        lines.append(f"| {info['description']} | {info['op'].replace('<=', '≤').replace('>=', '≥')} "
                     f"{info['limit']:g} | " + " | ".join(cells) + " |")
    return lines


def _variant_lines(models: Dict[str, Dict], baseline: str) -> List[str]:
    """The ablation table: every MNC model as trained (voting on, its config's test settings), then each
    test-time variant evaluated on the same weights; inference time as a ratio to the baseline's."""
    with_variants = {n: r for n, r in models.items() if _ok(r) and r.get("variants")}
    if not with_variants:
        return []
    base_time = inference_s_per_image(models[baseline]) if _ok(models.get(baseline)) else None
    lines = ["", "## Ablation: training-time choices (rows) × test-time variants (same weights)", "",
             "| model | test-time | segm AP | AP50 | AP75 | bbox AP | infer s/img | ÷ MR |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, result in with_variants.items():
        rows = [("as configured", result["eval"]["final"], inference_s_per_image(result))]
        rows += [(f"{variant}: `{' '.join(v['opts'])}`", v["eval"], v["inference"]["s_per_image"]["median"])
                 for variant, v in result["variants"].items()]
        for label, evaluation, seconds in rows:
            segm, bbox = evaluation.get("segm", {}), evaluation.get("bbox", {})
            lines.append("| " + " | ".join([
                f"{result.get('label', name)} (`{name}`)", label, _fmt(segm.get("AP"), ".1f"),
                _fmt(segm.get("AP50"), ".1f"), _fmt(segm.get("AP75"), ".1f"), _fmt(bbox.get("AP"), ".1f"),
                _fmt(seconds), _fmt(_ratio(seconds, base_time), ".2f")]) + " |")
    return lines


PROFILE_PARTS = ("backbone", "proposal_generator", "roi_heads", "forward_other", "forward", "backward")


def _profile_lines(models: Dict[str, Dict]) -> List[str]:
    """With --profile: seconds per part of one training iteration and one inference call."""
    profiled = {n: r["profile"] for n, r in models.items() if _ok(r) and r.get("profile")}
    if not profiled:
        return []
    lines = ["", "## Profile (`--profile`: one training iteration, one inference call; seconds, torch.profiler)", "",
             "| part | " + " | ".join(f"`{n}` train | `{n}` infer" for n in profiled) + " |",
             "|---|" + "---:|---:|" * len(profiled)]
    for part in PROFILE_PARTS:
        cells = [f"{_fmt(p.get('train', {}).get(part))} | {_fmt(p.get('inference', {}).get(part))}"
                 for p in profiled.values()]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines += ["", "`forward_other`: the forward outside backbone, RPN and ROI heads (preprocessing; at inference "
              "post-processing and mask pasting). Top operators: `runs/<model>/profile.txt`."]
    return lines


def _memory_phrase(models: Dict[str, Dict]) -> str:
    methods = {r["memory"]["method"] for r in models.values() if _ok(r)}
    if methods == {"rss_vmhwm"}:
        return "peak resident set size of the model's own process (VmHWM), the larger of training and inference"
    if methods == {"torch.cuda.max_memory_allocated"}:
        return "peak CUDA memory allocated by PyTorch, the larger of training and inference"
    return "peak memory (" + ", ".join(sorted(methods)) + ")"


# ------------------------------------------------------------------------------------ figure
def figure(report: Dict, path: str) -> None:
    """2 x 2: segm AP curves, bbox AP curves, train / inference time bars, peak memory bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    meta, models = report["benchmark"], report["models"]
    ok = {n: r for n, r in models.items() if _ok(r)}
    colors = {n: f"C{i}" for i, n in enumerate(models)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, task in zip(axes[0], ("segm", "bbox")):
        for name, result in ok.items():
            curve = [p for p in result["eval"]["curve"] if p.get(task, {}).get("AP") is not None]
            ax.plot([p["iter"] for p in curve], [p[task]["AP"] for p in curve], "o-", color=colors[name],
                    label=result.get("label", name))
        ax.set_title(f"{task} AP on {meta['val_dataset']}")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training iteration")
        ax.set_ylabel("COCO AP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    names = list(ok)
    ax = axes[1][0]
    width = 0.8 / max(len(names), 1)
    groups = [("train s/iter", train_s_per_iter), ("inference s/image", inference_s_per_image)]
    for i, name in enumerate(names):
        values = [fn(ok[name]) or 0.0 for _, fn in groups]
        bars = ax.bar([g + i * width for g in range(len(groups))], values, width, color=colors[name],
                      label=ok[name].get("label", name))
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))], [g for g, _ in groups])
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"time ({meta['device']}, {meta['threads']} threads)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    bars = ax.bar(range(len(names)), [peak_memory_mb(ok[n]) or 0.0 for n in names], color=[colors[n] for n in names])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(names)), [ok[n].get("label", n) for n in names], fontsize=8)
    ax.set_ylabel("MB")
    ax.set_title("peak memory")
    fig.suptitle(f"MNC vs Mask R-CNN: {meta['dataset']} ({meta['size']}), {meta['iters']} iterations, "
                 f"{meta['backbone']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ all outputs
def write_outputs(out_dir: str, meta: Dict, models: Dict[str, Dict]) -> Dict[str, str]:
    """Write benchmark.json, benchmark.md and benchmark.png into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    report = build_report(meta, models)
    paths = {kind: os.path.join(out_dir, name) for kind, name in RESULT_FILES.items()}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(report))
    figure(report, paths["figure"])
    return paths


# ------------------------------------------------------------------------------------ --time-only
TIMING_FILES = {"json": "timing.json", "markdown": "timing.md"}


def _inference_rule(meta: Dict) -> str:
    if meta.get("rounds", 1) == 1:
        return "median s/image at batch 1 on the val images"
    return (f"median over {meta['rounds']} rounds (the model order reversed every other round) of each round's "
            f"median s/image at batch 1 on the val images; in brackets, the lowest and highest ratio of one round")


def _round_ratios(result: Dict, base: Dict) -> str:
    """' (1.18-1.31)': the range of a model's inference ratio to the baseline's in the same round."""
    rounds, base_rounds = (r.get("inference", {}).get("round_medians") for r in (result, base))
    if not rounds or not base_rounds or len(rounds) != len(base_rounds):
        return ""
    ratios = [a / b for a, b in zip(rounds, base_rounds)]
    return f" ({min(ratios):.2f}-{max(ratios):.2f})"


def timing_markdown(meta: Dict, models: Dict[str, Dict], baseline: str = BASELINE) -> str:
    """Inference s/image and training s/iteration of every model (and test-time variant), with their ratios
    to the baseline, all from one ``--time-only`` invocation."""
    base = models.get(baseline) or {}
    base_inf, base_train, base_flops = inference_s_per_image(base), train_s_per_iter(base), gflops_per_image(base)
    lines = [f"# Timing: {meta['dataset']}, {meta['threads']} threads, one invocation", "",
             f"`{meta['command']}` (git {meta['git']}, started {meta['started']}, {meta['wall_s'] / 60:.1f} min). "
             f"Final weights of each model, timed back to back: inference = {_inference_rule(meta)}; training = "
             f"median s/iteration over {meta['timing_iters']} steps after a warm-up.", "",
             "| model | inference s/img | × Mask R-CNN | train s/iter | × Mask R-CNN | GFLOPs/img | × Mask R-CNN "
             "| train peak MB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in models.items():
        if not _ok(result):
            lines.append(f"| {name} | {result.get('status')}: {result.get('message', '')} | | | | | | |")
            continue
        inf, train = inference_s_per_image(result), train_s_per_iter(result)
        flops = gflops_per_image(result)
        lines.append(f"| {name} | {_fmt(inf)} | {_fmt(_ratio(inf, base_inf), '.2f')}{_round_ratios(result, base)} | "
                     f"{_fmt(train)} | "
                     f"{_fmt(_ratio(train, base_train), '.2f')} | {_fmt(flops, '.2f')} | "
                     f"{_fmt(_ratio(flops, base_flops), '.2f')} | {_fmt(result['memory'].get('train_peak_mb'), '.0f')} |")
        for variant, timing in (result.get("variants") or {}).items():
            v_inf = timing["inference"]["s_per_image"]["median"]
            lines.append(f"| {name} [{variant}] | {_fmt(v_inf)} | {_fmt(_ratio(v_inf, base_inf), '.2f')} | | | | | |")
    return "\n".join(lines) + "\n"


def write_timing(out_dir: str, meta: Dict, models: Dict[str, Dict]) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in TIMING_FILES.items()}
    with open(paths["json"], "w") as f:
        json.dump(_finite({"timing": meta, "models": models}), f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(timing_markdown(meta, models))
    return paths


def main(argv: List[str] = None) -> int:
    """Rebuild the markdown table and the figure from a saved benchmark.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    with open(argv[0]) as f:
        report = json.load(f)
    paths = write_outputs(os.path.dirname(os.path.abspath(argv[0])), report["benchmark"], report["models"])
    print("\n".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
