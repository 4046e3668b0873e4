"""Every entry point loads weights the same safe way (train_net's evaluation, the demo, export, analyze): no code
from a weights file runs, a checkpoint that does not fit the config is one ERROR line, and running without
weights needs --allow-untrained."""
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import Payload, INSTANT_CONFIG, REPO, TINY_TRAIN_NET_OPTS
from mnc_d2.checkpoint.safe_pickle import restricted_pickle_load
from mnc_d2.utils.errors import UnsafeCheckpointError

F2PY_PAYLOAD = b"cnumpy.f2py.__main__\nint\n."  # 29 bytes: importing the module runs f2py's command line


@pytest.mark.parametrize("payload", [F2PY_PAYLOAD, b"cnumpy.testing\nint\n.", b"cnumpy.f2py\nfloat\n.",
                                     b"cnumpy.distutils\nint\n.", b"c_pytest\nmain\n.", b"cos\nsystem\n."])
def test_allow_list_is_exact(payload):
    with pytest.raises(UnsafeCheckpointError, match="NOT loaded"):
        restricted_pickle_load(io.BytesIO(payload))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_weights_of_every_protocol_load(protocol):
    weights = {"a": np.zeros((2, 3), np.float32), "b": np.arange(3, dtype=np.int64), "c": np.float64(1.5),
               "d": np.array([True]), "e": np.zeros(2, np.float16), "f": np.uint8(3)}
    loaded = restricted_pickle_load(io.BytesIO(pickle.dumps({"model": weights, "x": [1, "s", b"b", None]},
                                                             protocol=protocol)))
    assert all(np.array_equal(loaded["model"][k], v) for k, v in weights.items())


def _write_payload(path, kind, marker):
    if kind == "f2py":
        path.write_bytes(F2PY_PAYLOAD)
        return
    content = {"model": {"backbone.x": np.zeros(2, dtype=np.float32)}, "extra": Payload(marker)}
    if path.suffix == ".pth":
        torch.save(content, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(content, f)


def _entry_point(tool, tmp_path, image, *opts, flags=()):
    if tool in ("train_net", "train"):  # train_net.py --eval-only, or training from MODEL.WEIGHTS
        cmd = [os.path.join(REPO, "train_net.py"), "--config-file", INSTANT_CONFIG,
               *(("--eval-only",) if tool == "train_net" else ()), *flags,
               *TINY_TRAIN_NET_OPTS, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "out"), *opts]
    elif tool == "demo":
        cmd = ["-m", "mnc_d2.tools.demo", "--config-file", INSTANT_CONFIG, "--input", str(image), "--output",
               str(tmp_path / "demo"), *flags, "--opts", *TINY_TRAIN_NET_OPTS, *opts]
    elif tool == "export":
        cmd = ["-m", "mnc_d2.tools.export", "--config-file", INSTANT_CONFIG, "--format", "torchscript",
               "--sample-image", str(image), "--output", str(tmp_path / "export"), *flags, *TINY_TRAIN_NET_OPTS, *opts]
    else:
        cmd = ["-m", "mnc_d2.tools.analyze", "--tasks", "parameter", "--config-file", INSTANT_CONFIG, *flags,
               *TINY_TRAIN_NET_OPTS, *opts]
    return [sys.executable, *cmd]


def _run(cmd, env, tmp_path):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def _one_error(out, *expected):
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
    assert len(error) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert all(e in error[0] for e in expected), error[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import cv2

    path = tmp_path_factory.mktemp("image") / "a.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tool, kind, suffix", [  # the f2py payload once: the unpickler is the same everywhere
    ("train_net", "f2py", ".pkl"), ("train", "system", ".pkl"), ("demo", "system", ".pkl"), ("demo", "system", ".pth"),
    ("export", "system", ".pkl"), ("analyze", "system", ".pkl"), ("analyze", "system", ".pth")])
def test_payload_weights_run_no_code_in_any_entry_point(tmp_path, tiny_run, image, tool, kind, suffix):
    _, env = tiny_run
    marker, weights = tmp_path / "payload_ran", tmp_path / f"hostile{suffix}"
    _write_payload(weights, kind, marker)
    out = _run(_entry_point(tool, tmp_path, image, "MODEL.WEIGHTS", str(weights)), env, tmp_path)
    assert not marker.exists(), "the file's code ran"
    _one_error(out, str(weights), "NOT loaded")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["demo", "export", "analyze"])
def test_a_checkpoint_that_does_not_fit_or_no_weights_is_an_error(tmp_path, tiny_run, image, tool):
    run, env = tiny_run
    weights = str(run / "model_final.pth")
    out = _run(_entry_point(tool, tmp_path, image, "MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.NUM_CLASSES", "3"),
               env, tmp_path)
    _one_error(out, weights, "trained for 5 classes", "NUM_CLASSES 3")
    _one_error(_run(_entry_point(tool, tmp_path, image), env, tmp_path), "MODEL.WEIGHTS is empty", "--allow-untrained")
    missing, truncated = tmp_path / "missing.pth", tmp_path / "truncated.pth"
    truncated.write_bytes((run / "model_final.pth").read_bytes()[:1000])
    _one_error(_run(_entry_point(tool, tmp_path, image, "MODEL.WEIGHTS", str(missing)), env, tmp_path), "does not exist")
    _one_error(_run(_entry_point(tool, tmp_path, image, "MODEL.WEIGHTS", str(truncated)), env, tmp_path), "truncated")
    if tool == "demo":  # the opt-in runs a random model; the trained weights run as before
        assert _run(_entry_point(tool, tmp_path, image, flags=("--allow-untrained",)), env, tmp_path).returncode == 0
        assert _run(_entry_point(tool, tmp_path, image, "MODEL.WEIGHTS", weights), env, tmp_path).returncode == 0


@pytest.mark.slow
def test_the_demo_skips_an_image_above_the_pixel_limit(tmp_path, tiny_run, image):
    run, env = tiny_run
    out = _run(_entry_point("demo", tmp_path, image, "MODEL.WEIGHTS", str(run / "model_final.pth"),
                            "MNC_RELIABILITY.MAX_IMAGE_PIXELS", "1000"), env, tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]  # nothing could be processed
    assert "64x64 pixels, more than MNC_RELIABILITY.MAX_IMAGE_PIXELS=1000" in out.stdout + out.stderr


DEMO_FULL_DISK = """
import runpy, sys
import cv2
written = []
def imwrite(path, image):  # the disk fills up after the first visualisation
    written.append(path)
    return len(written) == 1 and _imwrite(path, image)
_imwrite, cv2.imwrite = cv2.imwrite, imwrite
sys.argv = ["demo"] + sys.argv[1:]
runpy.run_module("mnc_d2.tools.demo", run_name="__main__")
"""


@pytest.mark.slow
def test_outputs_that_cannot_be_written_are_one_error_line_and_keep_what_was_done(tmp_path, tiny_run, image):
    run, env = tiny_run
    weights = ("MODEL.WEIGHTS", str(run / "model_final.pth"))
    runner = tmp_path / "full_disk_demo.py"
    runner.write_text(DEMO_FULL_DISK)
    second = tmp_path / "b.png"
    second.write_bytes(image.read_bytes())
    out = _run([sys.executable, str(runner), "--config-file", INSTANT_CONFIG, "--input", str(image), str(second),
                "--output", str(tmp_path / "demo"), "--opts", *TINY_TRAIN_NET_OPTS, *weights], env, tmp_path)
    _one_error(out, "cannot write", "b.png", "1 done")
    results = json.loads((tmp_path / "demo" / "coco_results.json").read_text())
    assert {r["image_id"] for r in results} <= {0}  # the first input's results were kept
    assert json.loads((tmp_path / "demo" / "image_ids.json").read_text())

    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    export = _entry_point("export", tmp_path, image, *weights)
    export[export.index(str(tmp_path / "export"))] = str(blocked / "export")
    _one_error(_run(export, env, tmp_path), "--output", "cannot write there")
