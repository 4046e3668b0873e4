"""benchmarks/gpu_check.sh --cpu-smoke: the one-shot GPU check end to end on CPU at tiny size (bundle built
for this interpreter, installed with --no-index --no-deps --target, GPU tests (skipped), the side-by-side
benchmark with the mnc3 profile), so the script is known to work the day a GPU machine runs it."""
import json
import os
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # benchmarks/gpu_check.sh's CPU smoke


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, D2_BUILD_DIR=str(tmp_path / "d2build"))
    run = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(out), "--cpu-smoke"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    for step in ("0/4 bundle", "1/4 install", "2/4 GPU tests", "3/4 MNC vs Mask R-CNN", "done in"):
        assert step in report, report
    assert f"detectron2 0.6 from {out / 'site'}" in report  # imported from the installed bundle
    models = json.loads((out / "bench" / "benchmark.json").read_text())["models"]
    assert {name: r["status"] for name, r in models.items()} == {"maskrcnn": "ok", "mnc3": "ok"}
    assert "detections/img" in report and (out / "bench" / "runs" / "mnc3" / "profile.txt").is_file()
