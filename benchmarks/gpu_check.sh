#!/usr/bin/env bash
# The one-shot GPU check: install the wheel bundle (scripts/gpu_bundle.sh, built on a CPU machine) into a
# folder, run the GPU tests, then MNC against Mask R-CNN side by side on the GPU, within a time budget.
#
#   bash benchmarks/gpu_check.sh OUT               # on the GPU machine; the bundle in .gpu_bundle/ (BUNDLE=...)
#   bash benchmarks/gpu_check.sh OUT --cpu-smoke   # anywhere: the same steps on CPU at tiny size, with a bundle
#                                                  # built here for this interpreter (what CI runs)
#
# Writes OUT/gpu_check.md (steps, versions, times) and OUT/bench/benchmark.{json,md,png} (+ runs/mnc3/
# profile.txt). Budget: the benchmark stops starting models after BUDGET_S (default 170 s) and is killed at
# HARD_S (default 230 s); the whole script is sized for <= 4 minutes on an H200.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:?usage: gpu_check.sh OUT [--cpu-smoke]}
MODE=${2:-gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-$REPO/.gpu_bundle}
SITE=$OUT/site
REPORT=$OUT/gpu_check.md
T0=$SECONDS
step() { echo "[gpu_check +$((SECONDS - T0))s] $*" | tee -a "$REPORT"; }
fail() { step "FAILED: $*"; exit 1; }
echo "# GPU check ($MODE), $(date -u +%FT%TZ)" > "$REPORT"

if [ "$MODE" = --cpu-smoke ]; then
  source "$REPO/scripts/python_env.sh"   # the repo's venv python (torch is reused, not bundled)
  BUNDLE=$OUT/bundle
  step "0/4 bundle for this interpreter (CPU smoke)"
  GPU_PYTHON=this bash "$REPO/scripts/gpu_bundle.sh" "$BUNDLE" >> "$OUT/bundle.log" 2>&1 || fail "gpu_bundle.sh (see $OUT/bundle.log)"
  SIZE=tiny DEVICE=cpu MODELS=maskrcnn,mnc3 BUDGET_S=${BUDGET_S:-600} HARD_S=${HARD_S:-900}
else
  SIZE=gpu DEVICE=cuda MODELS=maskrcnn,mnc3,mnc5,mnc3_bg_delta BUDGET_S=${BUDGET_S:-170} HARD_S=${HARD_S:-230}
fi
ls "$BUNDLE"/*.whl > /dev/null 2>&1 || fail "no wheels in $BUNDLE: run scripts/gpu_bundle.sh on a CPU machine first"

step "1/4 install the bundle into $SITE (no index, no deps)"
rm -rf "$SITE"
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" "$BUNDLE"/*.whl \
  >> "$OUT/install.log" 2>&1 || fail "pip install (see $OUT/install.log)"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
VERSIONS=$(PYTHONWARNINGS=ignore "$PY" - "$DEVICE" <<'PYCODE' 2>&1
import sys
try:
    import torch, torchvision, detectron2, mnc_d2  # noqa: F401
except Exception as e:  # name the missing piece at once, not minutes later
    print(f"import failed: {type(e).__name__}: {e}")
    sys.exit(1)
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (developed on 2.14.1), torchvision "
      f"{torchvision.__version__}, detectron2 {detectron2.__version__} from {detectron2.__file__}, CUDA "
      + (f"{torch.version.cuda} on {torch.cuda.get_device_name(0)}" if cuda else "not available"))
sys.exit(2 if sys.argv[1] == "cuda" and not cuda else 0)
PYCODE
) || fail "$VERSIONS"
step "versions: $VERSIONS"

step "2/4 GPU tests (pytest -m gpu)"
(cd "$REPO" && timeout 120 "$PY" -m pytest -m gpu -p no:cacheprovider tests/packaging/test_gpu.py tests/modeling/test_mask_voting.py \
  > "$OUT/pytest_gpu.log" 2>&1); status=$?
step "GPU tests: exit $status, $(tail -1 "$OUT/pytest_gpu.log")"

step "3/4 MNC vs Mask R-CNN ($MODELS; size $SIZE on $DEVICE; budget ${BUDGET_S}s, hard stop ${HARD_S}s)"
(cd "$REPO" && timeout -k 10 "$HARD_S" "$PY" -m benchmarks.run_benchmark --size "$SIZE" --device "$DEVICE" \
  --models "$MODELS" --variants none --profile-models mnc3 --budget-s "$BUDGET_S" --out "$OUT/bench" \
  > "$OUT/bench.log" 2>&1); bench=$?
[ -f "$OUT/bench/benchmark.md" ] || fail "the benchmark wrote nothing (exit $bench; see $OUT/bench.log)"
step "benchmark: exit $bench (124 = stopped at the hard limit; the table holds the models that finished)"
"$PY" - "$OUT/bench/benchmark.json" <<'PYCODE' | tee -a "$REPORT"
import json, sys
models = json.load(open(sys.argv[1]))["models"]
print("\ninference with detections per image (SCORE_THRESH_TEST 0 keeps every candidate):")
for name, r in models.items():
    if r.get("status") == "ok":
        inf = r["inference"]
        print(f"- {name}: {inf['s_per_image']['median']:.4f} s/img, {inf.get('detections_per_image_mean')} detections/img")
    else:
        print(f"- {name}: {r.get('status')}: {r.get('message', '')}")
PYCODE
cat "$OUT/bench/benchmark.md" >> "$REPORT"

if [ "$MODE" != --cpu-smoke ] && [ $((SECONDS - T0)) -lt 200 ]; then
  step "4/4 MNC 3-stage without AMP (time allows)"
  (cd "$REPO" && timeout -k 10 $((240 - (SECONDS - T0))) "$PY" -m benchmarks.run_benchmark --size gpu --device cuda \
    --models mnc3 --variants none --out "$OUT/bench_fp32" SOLVER.AMP.ENABLED False > "$OUT/bench_fp32.log" 2>&1)
  [ -f "$OUT/bench_fp32/benchmark.md" ] && cat "$OUT/bench_fp32/benchmark.md" >> "$REPORT"
else
  step "4/4 skipped (CPU smoke, or no time left)"
fi
step "done in $((SECONDS - T0)) s; report: $REPORT"
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"   # 5: no test collected/run (CPU: all skipped)
[ "$bench" -eq 0 ]
