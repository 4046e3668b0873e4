"""Multi-process training and evaluation on CPU (Gloo), spawned by train_net.py or by torchrun.

Two processes train a few iterations of the instant test; every process logs a digest of its weights
(log.txt, log.txt.rank1) and the digests must be equal; evaluation must see the whole validation set
(8 images) with each process evaluating half of it.
"""
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import REPO, TINY_TRAIN_NET_OPTS
from mnc_d2.engine.launch import ddp_device_kwargs, launch, state_dict_digest

pytestmark = pytest.mark.slow  # several training processes

CONFIG = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")
TINY = TINY_TRAIN_NET_OPTS + ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100"]
VAL_IMAGES = 8  # mnc_shapes_tiny_val


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, MNC_D2_CACHE=str(tmp_path_factory.mktemp("mnc_d2_cache")), PYTHONWARNINGS="ignore")


def _run(command, env, expect=0):
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _evaluated(log):
    match = re.search(r"Evaluated (\d+) images of mnc_shapes_tiny_val \(per process: ([\d, ]+); the dataset has (\d+)\)", log)
    assert match, "no evaluation summary in the log"
    return int(match.group(1)), [int(v) for v in match.group(2).split(",")], int(match.group(3))


def _segm_ap(log):
    return re.findall(r"copypaste: ([\d.,na]+)\n", log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env):
    """train_net.py --num-processes 2: two CPU processes with Gloo."""
    out_dir = tmp_path_factory.mktemp("two_processes")
    log = _run([sys.executable, os.path.join(REPO, "train_net.py"), "--num-processes", "2", "--dist-url", "auto",
                "--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(out_dir)], env)
    return out_dir, log


def test_two_processes_hold_identical_weights(trained):
    out_dir, log = trained
    digests = {}
    for rank, name in ((0, "log.txt"), (1, "log.txt.rank1")):
        text = open(out_dir / name).read()
        assert f"Rank of current process: {rank}. World size: 2" in text
        digests[rank] = re.findall(rf"Weights digest of process {rank}: ([0-9a-f]{{64}})", text)
    assert len(digests[0]) == len(digests[1]) == 1 and digests[0] == digests[1]
    assert "All 2 processes hold identical weights" in log
    final = torch.load(str(out_dir / "model_final.pth"), weights_only=True)
    assert final["iteration"] == 2
    assert state_dict_digest(SimpleNamespace(state_dict=lambda: final["model"])) == digests[0][0]


def test_evaluation_gathers_both_processes(trained):
    _, log = trained
    total, per_process, dataset = _evaluated(log)
    assert total == dataset == VAL_IMAGES and per_process == [VAL_IMAGES // 2, VAL_IMAGES // 2]


def test_torchrun_eval_only(trained, env, tmp_path):
    """Processes started by torchrun (env://) evaluate the two-process model: same images split, same AP."""
    out_dir, train_log = trained
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    log = _run([torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(REPO, "train_net.py"),
                "--config-file", CONFIG, "--eval-only", *TINY, "MODEL.WEIGHTS", str(out_dir / "model_final.pth"),
                "OUTPUT_DIR", str(tmp_path / "eval")], env)
    total, per_process, dataset = _evaluated(log)
    assert total == dataset == VAL_IMAGES and per_process == [VAL_IMAGES // 2, VAL_IMAGES // 2]
    assert _segm_ap(log) == _segm_ap(train_log) != []


def test_input_error_in_a_spawned_process_exits_cleanly(env, tmp_path):
    """A config error raised inside the processes: exit status 2 and the message, no traceback."""
    log = _run([sys.executable, os.path.join(REPO, "train_net.py"), "--num-processes", "2", "--dist-url", "auto",
                "--config-file", CONFIG, *TINY, "SOLVER.MAX_ITERS", "3", "OUTPUT_DIR", str(tmp_path)], env, expect=2)
    assert "ERROR (process 0): Command-line option SOLVER.MAX_ITERS 3: unknown config key" in log
    assert "did you mean SOLVER.MAX_ITER" in log and "Traceback" not in log


def test_ddp_on_cpu_gets_no_device_ids():
    assert ddp_device_kwargs(nn.Linear(2, 2)) == {"device_ids": None}


def test_single_process_launch_runs_in_place():
    assert launch(lambda x: x + 1, 1, args=(1,)) == 2


def test_state_dict_digest_sees_every_bit():
    model = nn.Linear(3, 2)
    before = state_dict_digest(model)
    with torch.no_grad():
        model.bias[0] = torch.nextafter(model.bias[0], torch.tensor(1.0))
    assert state_dict_digest(model) != before


def test_num_gpus_without_cuda_points_to_num_processes(monkeypatch):
    import importlib.util

    from mnc_d2.utils.errors import ConfigError

    spec = importlib.util.spec_from_file_location("train_net_module", os.path.join(REPO, "train_net.py"))
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = train_net.argument_parser().parse_args(["--num-gpus", "2", "--config-file", CONFIG])
    with pytest.raises(ConfigError, match="--num-gpus 2: CUDA is not available. Use --num-processes 2"):
        train_net.launch_from_args(args)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_machines(out_dir, env, *opts):
    """train_net.py as machine ranks 0 and 1 of a 2-machine job on loopback (one Gloo process each; one thread, as
    each of the 2-process run's processes gets), sharing OUTPUT_DIR as machines share a file system."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    return [subprocess.Popen([sys.executable, os.path.join(REPO, "train_net.py"), "--num-processes", "1",
                              "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url,
                              "--config-file", CONFIG, *TINY, *opts, "OUTPUT_DIR", str(out_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env=dict(env, OMP_NUM_THREADS="1"), start_new_session=True)  # a group per machine
            for rank in (0, 1)]


@pytest.mark.slow
def test_two_machines_on_loopback_train_as_two_processes(trained, env, tmp_path):
    out_dir = tmp_path / "two_machines"
    for machine in _two_machines(out_dir, env):
        out, err = machine.communicate(timeout=600)
        assert machine.returncode == 0, out[-3000:] + err[-3000:]
    text = (out_dir / "log.txt").read_text()
    assert "All 2 processes hold identical weights" in text
    final = torch.load(str(out_dir / "model_final.pth"), weights_only=True)["model"]
    one_machine = torch.load(str(trained[0] / "model_final.pth"), weights_only=True)["model"]
    assert all(torch.equal(final[k], one_machine[k]) for k in final)  # same ranks, same data, same maths


@pytest.mark.slow
def test_a_killed_machine_stops_the_other_with_one_error_line(env, tmp_path):
    import contextlib
    import signal
    import time

    out_dir = tmp_path / "killed"
    rank0, rank1 = _two_machines(out_dir, env, "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "2",
                                 "DATASETS.TEST", "()")
    try:
        deadline = time.time() + 300
        while not list(out_dir.glob("model_0000003.pth")) and time.time() < deadline and rank0.poll() is None:
            time.sleep(0.5)
        assert list(out_dir.glob("model_0000003.pth")), "training did not start"
        os.killpg(rank1.pid, signal.SIGKILL)  # machine 1 goes away: its launcher and its training process
        killed_at = time.time()
        out, err = rank0.communicate(timeout=120)
        assert time.time() - killed_at < 60
    finally:
        for machine in (rank0, rank1):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(machine.pid, signal.SIGKILL)
    assert rank0.returncode == 2, out[-2000:] + err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "lost another process of the job" in errors[0] and "Traceback" not in err, err[-3000:]
    last = (out_dir / "last_checkpoint").read_text().strip()
    assert torch.load(str(out_dir / last), weights_only=True)["model"]  # intact


@pytest.mark.slow
def test_a_killed_spawned_process_is_one_error_line(env, tmp_path):
    import signal
    import time

    out_dir = tmp_path / "killed_process"
    job = subprocess.Popen([sys.executable, os.path.join(REPO, "train_net.py"), "--num-processes", "2", "--dist-url",
                            "auto", "--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD",
                            "2", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out_dir)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        deadline = time.time() + 300
        while not (out_dir / "log.txt.rank1").exists() or not list(out_dir.glob("model_0000003.pth")):
            assert time.time() < deadline and job.poll() is None, "training did not start"
            time.sleep(0.5)
        rank1 = re.findall(r"Process 1 of 2: host \S+, pid (\d+)", (out_dir / "log.txt.rank1").read_text())
        pid = int(rank1[0]) if rank1 else None
        assert pid, "the log of process 1 names no pid"
        os.kill(pid, signal.SIGKILL)
        out, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert errors and "killed by signal 9" in errors[-1], err[-3000:]
