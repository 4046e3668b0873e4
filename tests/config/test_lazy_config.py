"""Python (LazyConfig) configs: the same models as the yacs configs, trained by train_net.py through the same
Trainer (bit-identical weights), with clear errors for bad keys and the same reliability (the kill-and-resume
tests of test_crash_recovery.py run for both config kinds; the lock and the NaN stop here)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import DictConfig, ListConfig

from conftest import LAZY_INSTANT_CONFIG, REPO, TINY_LAZY_OPTS, TINY_TRAIN_NET_OPTS
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from mnc_d2.config import build_cfg
from mnc_d2.utils.errors import ConfigError, NonFiniteError
from mnc_d2.config.lazy import load_lazy_config, trainer_cfg
from mnc_d2.engine import LazyTrainer
from mnc_d2.engine.run_lock import LOCK_NAME

PAIRS = [("configs/lazy/mnc_R18_GN_FPN_shapes_cpu.py", "configs/mnc_R18_GN_FPN_shapes_cpu.yaml"),
         ("configs/lazy/mnc_R_50_FPN_1x.py", "configs/mnc_R_50_FPN_1x.yaml"),
         ("configs/lazy/mnc_R_50_FPN_sbd_5stage.py", "configs/mnc_R_50_FPN_sbd_5stage.yaml")]
YAML_INSTANT = os.path.join(REPO, "configs", "quick_schedules", "mnc_R18_GN_FPN_shapes_instant_test.yaml")


def _settings(module):
    """The plain-valued attributes of a module (thresholds, sizes, switches), lists normalised."""
    def plain(value):
        return list(value) if isinstance(value, ListConfig) else dict(value) if isinstance(value, DictConfig) else value

    return {k: plain(v) for k, v in vars(module).items() if not k.startswith("_")
            and isinstance(v, (int, float, str, bool, tuple, list, dict, ListConfig, DictConfig))}


@pytest.mark.parametrize("lazy_file,yaml_file", PAIRS)
def test_the_lazy_model_is_the_yacs_model(lazy_file, yaml_file):
    """Same modules, state-dict keys, shapes and (for one seed) initial values; same settings in every head."""
    lazy = LazyConfig.load(os.path.join(REPO, lazy_file))
    torch.manual_seed(0)
    lazy_model = instantiate(lazy.model)
    torch.manual_seed(0)
    yacs_model = build_model(build_cfg(os.path.join(REPO, yaml_file), ["MODEL.DEVICE", "cpu"]))
    a, b = lazy_model.state_dict(), yacs_model.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert repr(lazy_model) == repr(yacs_model)
    for name in ("", "roi_heads", "proposal_generator", "roi_heads.box_predictor", "roi_heads.mask_head"):
        assert _settings(lazy_model.get_submodule(name)) == _settings(yacs_model.get_submodule(name)), name


def _train_net(*args, env, timeout=900):
    return subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.mark.slow
def test_lazy_config_trains_and_evaluates_as_the_yacs_config(tmp_path, env):
    """train_net.py --config-file x.py: train 4 iterations + evaluate; the weights are bit-identical to the
    yacs twin's (same seed, same data stream, same schedule: one Trainer)."""
    lazy_out, yacs_out = tmp_path / "lazy", tmp_path / "yacs"
    lazy = _train_net("--config-file", LAZY_INSTANT_CONFIG, *TINY_LAZY_OPTS, "train.max_iter=4",
                      "model.roi_heads.final_mask_head.conv_dims=[64,64,64,64,64]", "lr_multiplier.warmup_length=0.5",
                      "lr_multiplier.scheduler.values=[1.0]", "lr_multiplier.scheduler.milestones=[]",
                      "lr_multiplier.scheduler.num_updates=4", f"train.output_dir={lazy_out}", env=env)
    assert lazy.returncode == 0, lazy.stdout[-3000:] + lazy.stderr[-3000:]
    assert "copypaste: Task: segm" in lazy.stdout + lazy.stderr
    assert (lazy_out / "config_lazy.yaml").is_file()
    yacs = _train_net("--config-file", YAML_INSTANT, *TINY_TRAIN_NET_OPTS, "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()",
                      "SOLVER.WARMUP_ITERS", "2", "OUTPUT_DIR", str(yacs_out), env=env)
    assert yacs.returncode == 0, yacs.stdout[-3000:] + yacs.stderr[-3000:]
    a = torch.load(lazy_out / "model_final.pth", weights_only=True)["model"]
    b = torch.load(yacs_out / "model_final.pth", weights_only=True)["model"]
    assert list(a) == list(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


def _bad_config(tmp_path, *lines):
    """A .py config that takes the instant-test config and changes it by ``lines``."""
    path = tmp_path / "bad.py"
    path.write_text("\n".join([
        "from detectron2.config import LazyConfig",
        f"base = LazyConfig.load({LAZY_INSTANT_CONFIG!r})",
        "model, dataloader, optimizer, lr_multiplier, train = (base.model, base.dataloader, base.optimizer, "
        "base.lr_multiplier, base.train)",
        "del base", *lines]) + "\n")
    return str(path)


def test_bad_keys_name_the_file_or_the_override(tmp_path):
    path = _bad_config(tmp_path, "model.roi_heads.num_clases = 3")
    lazy = load_lazy_config(path)  # an argument no constructor takes: instantiate's TypeError, with the file
    with pytest.raises(ConfigError, match=rf"Config file {path}: model: cannot build it: TypeError: "
                                          r"ROIHeads.__init__\(\) got an unexpected keyword argument 'num_clases'"):
        LazyTrainer.for_config(lazy).build_model(trainer_cfg(lazy))
    path = _bad_config(tmp_path, "train.max_iters = 5")
    with pytest.raises(ConfigError, match=r"unknown key train.max_iters \(did you mean 'max_iter'\?\)"):
        load_lazy_config(path)
    with pytest.raises(ConfigError, match=r"override 'train.max_itr=5': no key 'train.max_itr' in the config "
                                          r"\(did you mean 'max_iter'\?\)"):
        load_lazy_config(LAZY_INSTANT_CONFIG, ["train.max_itr=5"])
    with pytest.raises(ConfigError, match="key=value overrides"):
        load_lazy_config(LAZY_INSTANT_CONFIG, ["SOLVER.MAX_ITER", "5"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_lazy_config(str(tmp_path / "none.py"))
    (tmp_path / "broken.py").write_text("model = 1 +\n")
    with pytest.raises(ConfigError, match=r"broken.py cannot be loaded: SyntaxError"):
        load_lazy_config(str(tmp_path / "broken.py"))


@pytest.mark.slow
def test_a_bad_key_is_an_error_line(tmp_path, env):
    path = _bad_config(tmp_path, "model.roi_heads.num_clases = 3")
    out = _train_net("--config-file", path, f"train.output_dir={tmp_path / 'out'}", env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"ERROR: Config file {path}: model: cannot build it: TypeError:" in out.stderr and "'num_clases'" in out.stderr


@pytest.mark.slow
def test_a_second_lazy_run_on_a_live_output_dir_is_refused(tmp_path, env):
    out_dir = tmp_path / "out"
    opts = [*TINY_LAZY_OPTS, f"train.output_dir={out_dir}", "train.checkpointer.period=100000"]
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", LAZY_INSTANT_CONFIG,
                              *opts, "train.max_iter=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env, cwd=REPO)
    try:
        deadline = time.time() + 300
        while not (out_dir / LOCK_NAME).exists() or not (out_dir / LOCK_NAME).read_text():
            assert first.poll() is None and time.time() < deadline, "the first run did not take the lock"
            time.sleep(0.05)
        second = _train_net("--config-file", LAZY_INSTANT_CONFIG, *opts, "train.max_iter=2", env=env, timeout=300)
        assert second.returncode == 2 and "is in use by another training run" in second.stderr, second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_nan_loss_stops_a_lazy_run_before_the_update(tmp_path, register_tiny_shapes):
    dataset = register_tiny_shapes("test_lazy_shapes", num_images=4, seed=7)
    lazy = load_lazy_config(LAZY_INSTANT_CONFIG, [*TINY_LAZY_OPTS, f"dataloader.train.names={dataset}",
                                                  "train.max_iter=6", "train.checkpointer.period=2",
                                                  f"train.output_dir={tmp_path / 'out'}"])
    trainer = LazyTrainer.for_config(lazy)(trainer_cfg(lazy))
    trainer.resume_or_load(resume=False)

    def nan_mask_loss(module, inputs, losses):
        if trainer.iter == 3:
            return dict(losses, loss_mask=losses["loss_mask"] * float("nan"))

    trainer.model.register_forward_hook(nan_mask_loss)
    with pytest.raises(NonFiniteError, match=r"iteration 3.*loss_mask=nan"):
        trainer.train()
    assert (tmp_path / "out" / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "out" / "model_final.pth").exists()


@pytest.mark.slow
def test_a_bad_loop_value_is_an_error_line_before_anything_is_written(tmp_path, env):
    out_dir = tmp_path / "out"
    for override, expected in [("train.max_iter=abc", "train.max_iter='abc': Type mismatch"),
                               ("dataloader.train.total_batch_size=0", "dataloader.train.total_batch_size=0: SOLVER.IMS_PER_BATCH must")]:
        out = _train_net("--config-file", LAZY_INSTANT_CONFIG, override, f"train.output_dir={out_dir}", env=env)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert f"ERROR: Config file {LAZY_INSTANT_CONFIG}: {expected}" in out.stderr
        assert not out_dir.exists()
