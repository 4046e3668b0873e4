"""``run_benchmark.py --seeds``: one benchmark run per seed (``<out>/seed<N>/``), then their summary in
``<out>/benchmark.{json,md}``: per model the mean ± std over the seeds, and the ratios / differences to
Mask R-CNN computed from the means. Pure functions of the per-seed results; no Detectron2 import::

    python -m benchmarks.seeds OUT   # rebuild OUT/benchmark.{json,md} from OUT/seed*/benchmark.json
"""
import glob
import json
import os
import re
import statistics
import sys
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402

# metric -> its value in one seed's worker result
METRICS = {
    "segm_AP": lambda r: report.final_ap(r, "segm", "AP"),
    "segm_AP50": lambda r: report.final_ap(r, "segm", "AP50"),
    "segm_AP75": lambda r: report.final_ap(r, "segm", "AP75"),
    "bbox_AP": lambda r: report.final_ap(r, "bbox", "AP"),
    "train_s_per_iter": report.train_s_per_iter,
    "train_cpu_s_per_iter": report.train_cpu_s_per_iter,
    "inference_s_per_image": report.inference_s_per_image,
    "peak_memory_mb": report.peak_memory_mb,
}


def _mean_std(values: List[float]):
    """Mean and sample standard deviation (n - 1; 0 for one value); (None, None) if a value is missing."""
    if not values or any(report._missing(v) for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _as_result(label: str, mean: Dict[str, float]) -> Dict:
    """The means in the shape of one worker result, so that ``report.compare`` gives the ratios of the means."""
    return {"status": "ok", "label": label,
            "train": {"s_per_iter": {"median": mean["train_s_per_iter"]},
                      "cpu_s_per_iter": {"median": mean["train_cpu_s_per_iter"]}},
            "inference": {"s_per_image": {"median": mean["inference_s_per_image"]}},
            "memory": {"train_peak_mb": mean["peak_memory_mb"]},
            "eval": {"final": {"segm": {k: mean[f"segm_{k}"] for k in ("AP", "AP50", "AP75")},
                               "bbox": {"AP": mean["bbox_AP"]}}}}


def summarize(per_seed: Dict[int, Dict[str, Dict]]) -> Dict[str, Dict]:
    """{seed: {model: worker result}} -> {model: {label, status, seeds, mean, std}}. A model is "ok" only
    when every seed trained ok; otherwise its failed seeds are named and it gets no mean."""
    names = list(dict.fromkeys(n for models in per_seed.values() for n in models))
    out = {}
    for name in names:
        results = {seed: models.get(name, {"status": "missing"}) for seed, models in per_seed.items()}
        label = next((r.get("label") for r in results.values() if r.get("label")), name)
        bad = {s: r for s, r in results.items() if not report._ok(r)}
        entry = {"label": label, "seeds": {s: {"status": r.get("status"), "segm_AP": METRICS["segm_AP"](r),
                                               "message": r.get("message", "")} for s, r in results.items()}}
        if bad:
            entry.update(status="failed", message="; ".join(f"seed {s}: {r.get('status')}: {r.get('message', '')}"
                                                            for s, r in bad.items()))
        else:
            stats = {m: _mean_std([f(r) for r in results.values()]) for m, f in METRICS.items()}
            entry.update(status="ok", mean={m: v[0] for m, v in stats.items()}, std={m: v[1] for m, v in stats.items()})
        out[name] = entry
    return out


def compare(summary: Dict[str, Dict], per_seed: Dict[int, Dict[str, Dict]]) -> Dict[str, Dict]:
    """report.compare on the means, plus the paired per-seed segm AP difference to the baseline (mean, std)
    and whether the mean difference is larger than the spread (the larger of the two models' std)."""
    means = {n: _as_result(e["label"], e["mean"]) for n, e in summary.items() if e["status"] == "ok"}
    out = report.compare(means)
    base = summary.get(report.BASELINE)
    for name, values in out.items():
        diffs = [report.final_ap(per_seed[s][name]) - report.final_ap(per_seed[s][report.BASELINE]) for s in per_seed]
        mean, std = _mean_std(diffs)
        spread = max(summary[name]["std"]["segm_AP"], base["std"]["segm_AP"])
        # one seed has no spread: whether a difference exceeds it is then unknown, not "yes"
        values.update(segm_ap_diff_per_seed={"mean": mean, "std": std}, segm_ap_spread=spread,
                      segm_ap_diff_exceeds_spread=None if mean is None or len(per_seed) < 2 else abs(mean) > spread)
    return out


def failure_summary(entry: Dict) -> str:
    """A failed model's seeds in a few words, e.g. "seed 2: diverged at iteration 78; seed 3: missing"."""
    return "; ".join(f"seed {s}: {report.failure_cell(v)}" for s, v in entry["seeds"].items() if v["status"] != "ok")


def _pm(mean: Optional[float], std: Optional[float], spec: str = ".1f") -> str:
    return "–" if mean is None else f"{mean:{spec}} ± {std:{spec.lstrip('+')}}"  # a sign on the mean only


def markdown(data: Dict) -> str:
    meta, summary, comparison = data["benchmark"], data["models"], data["comparison"]
    seeds = meta["seeds"]
    lines = [f"# MNC vs Detectron2 Mask R-CNN: `{meta['dataset']}`, seeds {', '.join(map(str, seeds))}", "",
             f"Mean ± sample std over {len(seeds)} seeds (one training run per model and seed, same settings "
             f"otherwise: {meta['iters']} iterations, {meta['backbone']}). Per-seed runs and commands:"]
    lines += [f"- seed {s}: `seed{s}/benchmark.md`: `{c}`" for s, c in zip(seeds, meta["commands"])]
    lines += ["", "| model | segm AP | AP50 | AP75 | bbox AP | segm AP per seed | Δ segm AP (means) | Δ per seed "
              "| Δ > spread | infer ÷ MR | train ÷ MR |", "|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for name, e in summary.items():
        title = f"{e['label']} (`{name}`)"
        per_seed = " / ".join("–" if v["segm_AP"] is None else f"{v['segm_AP']:.1f}" for v in e["seeds"].values())
        if e["status"] != "ok":
            lines.append(f"| {title} | {failure_summary(e)} | | | | {per_seed} |" + " |" * 5)
            continue
        m, s, c = e["mean"], e["std"], comparison.get(name, {})
        is_base = name == report.BASELINE
        diff = c.get("segm_ap_diff_per_seed", {})
        lines.append("| " + " | ".join([
            title, _pm(m["segm_AP"], s["segm_AP"]), _pm(m["segm_AP50"], s["segm_AP50"]),
            _pm(m["segm_AP75"], s["segm_AP75"]), _pm(m["bbox_AP"], s["bbox_AP"]), per_seed,
            "0.0" if is_base else report._fmt(c.get("segm_ap_diff"), "+.1f"),
            "–" if is_base else _pm(diff.get("mean"), diff.get("std"), "+.1f"),
            "–" if is_base else {True: "yes", False: "no", None: "–"}[c.get("segm_ap_diff_exceeds_spread")],
            "1.00" if is_base else report._fmt(c.get("inference_time_ratio"), ".2f"),
            "1.00" if is_base else report._fmt(c.get("train_time_ratio"), ".2f"),
        ]) + " |")
    lines += ["", "Δ segm AP (means): mean AP − Mask R-CNN's mean AP. Δ per seed: the same difference taken seed "
              "by seed (same seed, same data order), mean ± std. Δ > spread: |Δ| is larger than the larger of the "
              "two models' std over seeds; a smaller difference is not a result. Time ratios: means of the "
              "per-seed runs' medians (those runs may have shared the machine; quiet-machine times come from "
              "`--time-only`).", ""]
    if comparison:
        lines += report.target_lines(data["targets"], comparison) + [
            "", "Verdicts on the means; Δ segm AP ≥ 0 is a result only where Δ > spread says yes.", ""]
    return "\n".join(lines)


def build(metas: Dict[int, Dict], per_seed: Dict[int, Dict[str, Dict]]) -> Dict:
    first = metas[min(metas)]
    meta = {k: v for k, v in first.items() if k not in ("seed", "command", "started", "wall_s")}
    meta.update(seeds=sorted(per_seed), commands=[metas[s]["command"] for s in sorted(metas)],
                started=[metas[s]["started"] for s in sorted(metas)])
    summary = summarize({s: per_seed[s] for s in sorted(per_seed)})
    return report._finite({"benchmark": meta, "baseline": report.BASELINE,
                           "targets": {k: {"description": d, "op": op, "limit": limit, "model": report.TARGET_MODEL}
                                       for k, (d, op, limit) in report.JUDGED_TARGETS.items()},
                           "models": summary, "comparison": compare(summary, per_seed)})


def write_outputs(out_dir: str, metas: Dict[int, Dict], per_seed: Dict[int, Dict[str, Dict]]) -> Dict[str, str]:
    data = build(metas, per_seed)
    paths = {k: os.path.join(out_dir, report.RESULT_FILES[k]) for k in ("json", "markdown")}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(data))
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    metas, per_seed = {}, {}
    for path in sorted(glob.glob(os.path.join(argv[0], "seed*", report.RESULT_FILES["json"]))):
        seed = int(re.search(r"seed(\d+)", path).group(1))
        with open(path) as f:
            run = json.load(f)
        metas[seed], per_seed[seed] = run["benchmark"], run["models"]
    if not per_seed:
        print(f"no {argv[0]}/seed*/benchmark.json", file=sys.stderr)
        return 1
    print("\n".join(write_outputs(argv[0], metas, per_seed).values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
