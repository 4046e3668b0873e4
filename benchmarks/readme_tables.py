"""Regenerate the README's headline results from the benchmark files, never by hand::

    python -m benchmarks.readme_tables README.md docs/benchmarks/headline/shapes docs/benchmarks/headline/hela
    python -m benchmarks.readme_tables --compact README.md docs/benchmarks/headline/shapes docs/benchmarks/headline/hela
    python -m benchmarks.readme_tables --plot docs/benchmarks/headline_ap.png docs/benchmarks/headline_more_seeds/shapes ...

Each folder is a ``run_benchmark.py --seeds`` output (``benchmark.json``: mean ± std per model) or a one-seed
run; its ``timing.json`` (a quiet ``--time-only`` invocation), if there, is added below its table. The text
between ``<!-- headline:begin -->`` and ``<!-- headline:end -->`` in the README is replaced; the rest of the
file is kept. ``--compact`` writes one table for all folders (segm AP over seeds, the difference to Mask R-CNN,
the quiet timing's ratios) and links each folder's full ``benchmark.md``: the README's form. Pure text work: no
Detectron2 import.
"""
import json
import os
import sys
from typing import List

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report, seeds  # noqa: E402

BEGIN, END = "<!-- headline:begin -->", "<!-- headline:end -->"


def _demote(markdown: str, source: str) -> List[str]:
    """A benchmark.md / timing.md body under the README's "###" level, its title naming its folder."""
    lines = markdown.rstrip().splitlines()
    out = []
    for line in lines:
        if line.startswith("# "):
            out.append(f"#### {line[2:]} (`{source}`)")
        elif line.startswith("#"):
            out.append("###" + line)
        else:
            out.append(line)
    return out


def section(folder: str, repo: str) -> List[str]:
    """The README lines for one benchmark folder."""
    rel = os.path.relpath(folder, repo)
    with open(os.path.join(folder, report.RESULT_FILES["json"])) as f:
        data = json.load(f)
    text = seeds.markdown(data) if "seeds" in data["benchmark"] else report.markdown(data)
    lines = _demote(text, rel)
    timing = os.path.join(folder, "timing.json")
    if os.path.exists(timing):
        with open(timing) as f:
            t = json.load(f)
        lines += [""] + _demote(report.timing_markdown(t["timing"], t["models"]), rel + "/timing.json")
    return lines


def _timing_ratios(folder: str, name: str):
    """(inference, training, GFLOPs) ratios to Mask R-CNN from the folder's timing.json, or Nones."""
    path = os.path.join(folder, "timing.json")
    if not os.path.exists(path):
        return None, None, None
    with open(path) as f:
        models = json.load(f)["models"]
    base, result = models.get(report.BASELINE), models.get(name)
    if not (report._ok(base) and report._ok(result)):
        return None, None, None
    return (report._ratio(report.inference_s_per_image(result), report.inference_s_per_image(base)),
            report._ratio(report.train_s_per_iter(result), report.train_s_per_iter(base)),
            report._ratio(report.gflops_per_image(result), report.gflops_per_image(base)))


def compact(folders: List[str], repo: str) -> List[str]:
    """One table over every folder: per model, segm AP mean ± std over the seeds and per seed, the difference
    to Mask R-CNN and whether it exceeds the spread, and the ratios of the folder's quiet timing.json."""
    lines = ["| dataset | model | segm AP (mean ± std) | per seed | Δ vs Mask R-CNN | Δ > spread "
             "| infer ÷ MR | train ÷ MR | GFLOPs ÷ MR |", "|---|---|---:|---|---:|---|---:|---:|---:|"]
    notes = []
    for folder in folders:
        rel = os.path.relpath(folder, repo)
        with open(os.path.join(folder, report.RESULT_FILES["json"])) as f:
            data = json.load(f)
        meta, comparison = data["benchmark"], data.get("comparison", {})
        seeds_run = meta.get("seeds") or [meta.get("seed")]
        dataset = f"[{meta['dataset']}]({rel}/benchmark.md), {meta['iters']} it, seeds {', '.join(map(str, seeds_run))}"
        for name, e in data["models"].items():
            if "seeds" not in e:  # a one-seed benchmark.json: no summary to show in this form
                continue
            per_seed = " / ".join("–" if v["segm_AP"] is None else f"{v['segm_AP']:.1f}" for v in e["seeds"].values())
            c, is_base = comparison.get(name, {}), name == report.BASELINE
            inf, train, flops = (1.0, 1.0, 1.0) if is_base else _timing_ratios(folder, name)
            ap = seeds._pm(e["mean"]["segm_AP"], e["std"]["segm_AP"]) if e["status"] == "ok" else seeds.failure_summary(e)
            lines.append("| " + " | ".join([
                dataset, f"`{name}`", ap, per_seed,
                "–" if is_base else report._fmt(c.get("segm_ap_diff"), "+.1f"),
                "–" if is_base else {True: "yes", False: "no", None: "–"}[c.get("segm_ap_diff_exceeds_spread")],
                report._fmt(inf, ".2f"), report._fmt(train, ".2f"), report._fmt(flops, ".2f")]) + " |")
            dataset = ""
        if os.path.exists(os.path.join(folder, "timing.json")):
            with open(os.path.join(folder, "timing.json")) as f:
                t = json.load(f)["timing"]
            notes.append(f"{meta['dataset']}: `{t['command']}` ({t['threads']} threads, git {t['git']}, "
                         f"[timing.md]({rel}/timing.md))")
    lines += ["", "Δ: mean segm AP − Mask R-CNN's; \"Δ > spread\": larger than either model's std over the seeds "
              "(else not a result). Time ratios come from one quiet `--time-only` invocation per dataset that "
              "re-timed one seed's final weights back to back" + (": " + "; ".join(notes) if notes else
                                                                   " (none yet: –)") + "."]
    return lines


def plot(folders: List[str], path: str, models=("mnc3", "maskrcnn")) -> None:
    """segm AP per seed of ``models``, one panel per folder (``--plot PATH``): the README's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(folders), figsize=(3.2 * len(folders), 2.6), squeeze=False)
    for ax, folder in zip(axes[0], folders):
        with open(os.path.join(folder, report.RESULT_FILES["json"])) as f:
            data = json.load(f)
        for name, marker in zip(models, "os^"):
            per_seed = data["models"][name]["seeds"]
            label = {"mnc3": "MNC's default", "maskrcnn": "Mask R-CNN"}.get(name, name)
            ax.plot([int(s) for s in per_seed], [v["segm_AP"] for v in per_seed.values()], marker, label=label)
        ax.set_title(data["benchmark"]["dataset"])
        ax.set_xlabel("seed")
        ax.set_ylabel("segm AP")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})


def regenerate(readme_text: str, folders: List[str], repo: str, compact_form: bool = False) -> str:
    if BEGIN not in readme_text or END not in readme_text:
        raise ValueError(f"the README has no {BEGIN} ... {END} block to regenerate")
    head, rest = readme_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = [BEGIN, f"<!-- generated by: python -m benchmarks.readme_tables {' '.join(sys.argv[1:]) or '...'} -->", ""]
    if compact_form:
        body += compact(folders, repo) + [""]
    for folder in [] if compact_form else folders:
        body += section(folder, repo) + [""]
    return head + "\n".join(body + [END]) + tail


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    compact_form = "--compact" in argv
    argv = [a for a in argv if a != "--compact"]
    figure = None
    if "--plot" in argv:  # --plot PATH FOLDER...: the figure of those folders (no README)
        i = argv.index("--plot")
        figure, argv = argv[i + 1], argv[:i] + argv[i + 2:]
        plot(argv, figure)
        return 0
    if len(argv) < 2:
        print(__doc__)
        return 2
    readme, folders = argv[0], argv[1:]
    missing = [f for f in folders if not os.path.exists(os.path.join(f, report.RESULT_FILES["json"]))]
    if missing:
        print(f"no {report.RESULT_FILES['json']} in: {', '.join(missing)}", file=sys.stderr)
        return 1
    repo = os.path.dirname(os.path.abspath(readme))
    with open(readme) as f:
        text = f.read()
    try:
        new = regenerate(text, [os.path.abspath(f) for f in folders], repo, compact_form)
    except ValueError as e:
        print(f"{readme}: {e}", file=sys.stderr)
        return 1
    with open(readme, "w") as f:
        f.write(new)
    print(f"{readme}: headline block regenerated from {', '.join(folders)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
