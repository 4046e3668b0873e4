"""scripts/gpu_bundle.sh: the wheels a bare GPU machine needs, installed the way it installs them
(``pip install --no-index --no-deps --target DIR``); here built for this interpreter (the CPU smoke of the
recipe: CI never has a GPU)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.network]  # builds the GPU wheel bundle

WHEELS = ("pb1_detectron2-0.6-py3-none-any", "fvcore", "iopath", "yacs", "omegaconf", "hydra_core",
          "antlr4_python3_runtime", "termcolor", "tabulate", "portalocker", "cloudpickle", "pycocotools", "pyyaml")


def test_bundle_installs_with_no_index_and_serves_the_imports(tmp_path):
    bundle, target = tmp_path / "bundle", tmp_path / "site"
    env = dict(os.environ, GPU_PYTHON="this", D2_BUILD_DIR=str(tmp_path / "d2build"))
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_bundle.sh"), str(bundle)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    wheels = sorted(p.name for p in bundle.glob("*.whl"))
    assert all(any(w.lower().startswith(name.lower()) for w in wheels) for name in WHEELS), wheels
    assert sum(p.stat().st_size for p in bundle.iterdir()) < 48 << 20
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                              str(target), *map(str, bundle.glob("*.whl"))], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import detectron2, fvcore, iopath, yacs, omegaconf, hydra, pycocotools, yaml, termcolor, tabulate\n"
            "from detectron2 import _C\n"
            "from detectron2.utils.collect_env import collect_env_info\n"
            "import mnc_d2\n"
            "collect_env_info()\n"
            "print(detectron2.__file__, _C.__file__, omegaconf.__file__)")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(target), REPO])), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(path.startswith(str(target)) for path in run.stdout.split()), run.stdout  # served by the bundle


def test_mnc_d2_imports_without_scipy_and_tifffile():
    # a GPU machine's Python has neither; only SBD (.mat) and tiff reading need them, lazily
    code = "import sys; sys.modules['scipy'] = sys.modules['tifffile'] = None\nimport mnc_d2; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
