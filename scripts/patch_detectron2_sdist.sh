#!/usr/bin/env bash
# Patches an unpacked pb1-detectron2==0.6 sdist (the official v0.6 Python code) so it builds and runs
# with today's toolchain. Each patch is listed, with its reason, in README.md ("Detectron2 workarounds"),
# and tests/packaging/test_install_workarounds.py fails if one is missing from the installed detectron2.
set -euo pipefail
SRC=${1:?usage: patch_detectron2_sdist.sh <unpacked sdist dir>}
cd "$SRC"
patch_re() { local f=$1 re=$2; shift 2
  grep -qE "$re" "$f" || { echo "patch target missing: $f: $re" >&2; exit 1; }; sed -i -E "$@" "$f"; }

# (1) The sdist lacks detectron2/layers/csrc, so its C++ extension cannot be built. A pure-Python
#     detectron2/_C.py serves the three functions collect_env_info() (hence default_setup()) calls, and
#     setup.py builds no extension: the result is a pure-Python wheel (py3-none-any) that installs without
#     a compiler on any Python >= 3.9 and any torch. MNC needs no _C op: RoIAlign and NMS come from
#     torchvision, which has CPU and CUDA kernels.
cat > detectron2/_C.py <<'PY'
"""Pure-Python stand-in for detectron2's C++ extension (mnc_d2's patched pb1-detectron2 0.6 build).

It serves the calls of ``detectron2.utils.collect_env``; the C++/CUDA ops (deformable convolution, rotated
boxes, the fast COCOeval) are absent. mnc_d2 uses torchvision's RoIAlign and NMS instead.
"""


def get_compiler_version():
    return "none (pure-Python detectron2._C, mnc_d2 patch)"


def get_cuda_version():
    return "none (pure-Python detectron2._C, mnc_d2 patch)"


def has_cuda():
    return False
PY
patch_re setup.py '^    ext_modules=get_extensions\(\),$' -e 's/^    ext_modules=get_extensions\(\),$/    ext_modules=[],/' \
  -e 's/^    cmdclass=\{"build_ext": torch\.utils\.cpp_extension\.BuildExtension\},$/    cmdclass={},/'
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
# (7) Python >= 3.11: random.sample() takes no set. MapDataset samples its fallback index from a set
#     whenever a mapper returns None (a skipped image): TypeError with D2's own loader.
patch_re detectron2/data/common.py 'self\._rng\.sample\(self\._fallback_candidates, k=1\)' \
  -e 's/self\._rng\.sample\(self\._fallback_candidates, k=1\)/self._rng.sample(sorted(self._fallback_candidates), k=1)/'
# (8) numpy >= 2: np.array(x, copy=False) raises when a copy is needed (the legacy mask paste converts a
#     PIL image). np.asarray copies only when needed, as copy=False did in numpy 1.
patch_re detectron2/layers/mask_ops.py 'np\.array\(mask, copy=False\)' -e 's/np\.array\(mask, copy=False\)/np.asarray(mask)/'
if grep -rnE 'np\.array\([^)]*copy=False' --include=*.py detectron2; then
  echo "np.array(..., copy=False) left in the sdist (see above): add a patch" >&2; exit 1
fi
# (9) torch >= 1.10 ships no caffe2: detectron2.export's __init__ imports its Caffe2 API (export/api.py:
#     `from caffe2.proto import caffe2_pb2`) first, so TracingAdapter, and detectron2.utils.analysis (FLOP
#     counts, tools/analyze_model.py) with it, fail to import. Import the Caffe2 part only where caffe2 exists.
patch_re detectron2/export/__init__.py '^from \.api import \*$' \
  -e 's/^from \.api import \*$/try:\n    from .api import *  # noqa\nexcept ImportError:  # mnc_d2 patch: no caffe2 (torch >= 1.10); the tracing parts need none\n    pass/'
# The patch level: scripts/check_detectron2.py rebuilds a patched detectron2 older than this script.
echo "LEVEL = 3  # scripts/patch_detectron2_sdist.sh" > detectron2/_mnc_d2_patches.py
echo "patched detectron2 sdist in $SRC"
