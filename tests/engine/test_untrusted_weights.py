"""Weights files that hold code (issue "Reliability, round two", items 11 and 12), through train_net.py:
a payload .pth or .pkl is refused with a plain ERROR, its code never runs; a real D2-format .pkl loads."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import Payload, REPO, TINY_TRAIN_NET_OPTS

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")


def _eval_only(weights, out_dir, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, "--eval-only",
                           *TINY_TRAIN_NET_OPTS, "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out_dir)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_payload_weights_are_refused_and_never_run(tmp_path, env, suffix):
    marker = tmp_path / "payload_ran"
    weights = tmp_path / f"hostile{suffix}"
    content = {"model": {"backbone.x": np.zeros(2, dtype=np.float32)}, "__author__": "someone", "extra": Payload(marker)}
    if suffix == ".pth":
        torch.save(content, str(weights))
    else:
        with open(weights, "wb") as f:
            pickle.dump(content, f)
    out = _eval_only(weights, tmp_path / "out", env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert not marker.exists(), "the file's code ran"
    error = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
    assert len(error) == 1 and str(weights) in error[0] and "NOT loaded" in error[0], out.stderr[-2000:]
    assert "truncated" not in error[0] and "likely succeed" not in error[0]


@pytest.mark.slow
def test_d2_format_pkl_loads_and_trust_env_restores_plain_pickle(tmp_path, env):
    from detectron2.modeling import build_model

    from mnc_d2.config import build_cfg

    model = build_model(build_cfg(CONFIG, TINY_TRAIN_NET_OPTS))
    state = {k: v.numpy() + 0.5 for k, v in model.state_dict().items()}  # D2 model-zoo layout: numpy arrays
    weights = tmp_path / "model_final_abc.pkl"
    with open(weights, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    out = _eval_only(weights, tmp_path / "out", env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "segm" in out.stdout + out.stderr

    from mnc_d2.checkpoint.warm_start import MNCWarmStartCheckpointer

    MNCWarmStartCheckpointer(model).load(str(weights))
    assert all(np.array_equal(v.numpy(), state[k]) for k, v in model.state_dict().items() if k in state
               and k not in ("pixel_mean", "pixel_std"))

    marker = tmp_path / "trusted_ran"
    trusted = tmp_path / "trusted.pkl"
    with open(trusted, "wb") as f:
        pickle.dump({"model": state, "__author__": "me", "extra": Payload(marker)}, f)
    out = subprocess.run([sys.executable, "-c", f"import mnc_d2, torch; from mnc_d2.checkpoint.warm_start import "
                          f"MNCWarmStartCheckpointer as C; from detectron2.modeling import build_model; "
                          f"from mnc_d2.config import build_cfg; import sys; "
                          f"C(build_model(build_cfg({CONFIG!r}, {TINY_TRAIN_NET_OPTS!r}))).load({str(trusted)!r})"],
                         capture_output=True, text=True, env=dict(env, MNC_D2_TRUST_PICKLE="1"), cwd=REPO, timeout=300)
    assert out.returncode == 0 and marker.exists(), out.stderr[-2000:]  # the escape hatch: plain pickle
