#!/usr/bin/env bash
# Patches an unpacked pb1-detectron2==0.6 sdist (the official v0.6 Python code) so it builds and runs
# with today's toolchain. Each patch is listed, with its reason, in README.md ("Detectron2 workarounds"),
# and tests/test_install_workarounds.py fails if one is missing from the installed detectron2.
set -euo pipefail
SRC=${1:?usage: patch_detectron2_sdist.sh <unpacked sdist dir>}
cd "$SRC"
patch_re() { local f=$1 re=$2; shift 2
  grep -qE "$re" "$f" || { echo "patch target missing: $f: $re" >&2; exit 1; }; sed -i -E "$@" "$f"; }

# (1) The sdist lacks detectron2/layers/csrc: build a stub extension. It defines only the three
#     functions collect_env_info() (hence default_setup()) calls. MNC needs no _C op: RoIAlign and
#     NMS come from torchvision, which has CPU and CUDA kernels.
mkdir -p detectron2/layers/csrc
cat > detectron2/layers/csrc/vision.cpp <<'CPP'
#include <torch/extension.h>
#include <string>
static std::string compiler() { return std::string("GCC ") + __VERSION__; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_compiler_version", &compiler);
  m.def("get_cuda_version", []() { return std::string("none (CPU stub)"); });
  m.def("has_cuda", []() { return false; });
}
CPP
# (2) setup.py globs ./configs for the model-zoo package data; the sdist ships them elsewhere.
cp -r detectron2/model_zoo/configs ./configs
# (3) Pillow >= 10 removed Image.LINEAR (an alias of BILINEAR), read at import of data.transforms.
patch_re detectron2/data/transforms/transform.py 'Image\.LINEAR' -e 's/Image\.LINEAR/Image.BILINEAR/'
# (4) setuptools >= 81 has no pkg_resources (model_zoo): resolve config paths next to the module.
patch_re detectron2/model_zoo/model_zoo.py '^import pkg_resources' -e 's/^import pkg_resources$//' \
  -e 's/pkg_resources\.resource_filename\(/_resource_filename(/'
printf '\n\ndef _resource_filename(_pkg, rel):\n    return os.path.join(os.path.dirname(__file__), rel)\n' \
  >> detectron2/model_zoo/model_zoo.py
# (5) numpy >= 1.24 removed the aliases np.int/np.float/np.str/np.object (np.bool came back in 2.x).
grep -rlE '\bnp\.(bool|int|float|object|str)\b' --include=*.py detectron2 \
  | xargs -r sed -i -E 's/\bnp\.(bool|int|float|object|str)\b/\1/g'
# (6) No C++ COCOeval in the stub: make the "fast" evaluator fall back to pycocotools' COCOeval.
printf '\n\nif not hasattr(_C, "COCOevalAccumulate"):  # CPU stub: fall back to pycocotools\n    COCOeval_opt = COCOeval  # noqa\n' \
  >> detectron2/evaluation/fast_eval_api.py
echo "patched detectron2 sdist in $SRC"
