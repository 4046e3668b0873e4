"""Train, evaluate and time ONE model; run by ``run_benchmark.py`` as a subprocess per model.

    python -m benchmarks.worker SPEC.json

A process per model keeps the measurements apart: peak memory, thread pools, allocator caches and
random state of one model cannot leak into the next. The spec (written by ``run_benchmark.py``)
names a config file, opts and the measurement settings; the result is written as JSON to
``spec["result_file"]``. Lines starting with ``[bench]`` are progress, the rest is Detectron2's log.

What is measured:
- training: wall (and process CPU) seconds of each ``run_step`` (data, forward, backward, optimizer
  step), timed by the first hook so periodic evaluation and checkpointing are left out; the median
  over the iterations after ``train_warmup``;
- inference: ``model([input])`` at batch 1 in eval mode under ``torch.no_grad()`` over the val
  images (post-processing and mask pasting included; image decoding not), median after warm-up;
- peak memory: resident set size high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
  over the training steps and over the inference loop; ``torch.cuda.max_memory_allocated`` on GPU;
- AP: Detectron2's evaluator after every ``TEST.EVAL_PERIOD`` iterations and at the end.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

from benchmarks import control_heads  # noqa: F401  (registers the controls' ROI heads)

AP_KEYS = ("AP", "AP50", "AP75")
TASKS = ("segm", "bbox")


def progress(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# ---------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of this process in MiB: CUDA allocator peak on GPU, else the peak resident set size.

    On Linux the RSS peak (``VmHWM``) is reset by writing "5" to ``/proc/self/clear_refs``, so the
    training and inference peaks are measured separately; each reset is checked (``VmHWM`` must
    drop to ``VmRSS``). Where it cannot be reset, or elsewhere, ``ru_maxrss`` is used, which
    never goes down (``resettable`` is False and the inference peak is then max(train, inference)).
    """

    RESET_SLACK_MB = 16.0  # RSS may grow between the reset and the read

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
            self.resettable = True
        else:
            self.resettable = self._clear_refs()
            self.method = "rss_vmhwm" if self.resettable else "rss_ru_maxrss"

    @classmethod
    def _clear_refs(cls) -> bool:
        """Reset ``VmHWM`` to the current RSS; False where the kernel refuses or ignores the reset."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        hwm, rss = cls._status_mb("VmHWM"), cls._status_mb("VmRSS")
        # Some kernels accept the write and keep the old peak: then the peak is not resettable.
        return hwm is not None and rss is not None and hwm <= rss + cls.RESET_SLACK_MB

    @staticmethod
    def _status_mb(field: str) -> Optional[float]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024.0  # kB
        except OSError:
            pass
        return None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable and not self._clear_refs():
            self.resettable, self.method = False, "rss_ru_maxrss"

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.resettable:
            return self._status_mb("VmHWM")
        scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024.0

    def current_mb(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        current = self._status_mb("VmRSS")
        return current if current is not None else self.peak_mb()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- hooks
class StepClock(HookBase):
    """Times ``run_step`` and tracks the memory peak of the training steps.

    Must come before D2's default hooks: its ``after_step`` then runs before the evaluation and
    checkpoint hooks, so neither is counted."""

    def __init__(self, memory: PeakMemory, device: str):
        self.memory = memory
        self.device = device
        self.wall: List[float] = []  # seconds per iteration, in order
        self.cpu: List[float] = []  # process CPU seconds per iteration (all threads)
        self.loss: List[List[float]] = []  # [iteration (1-based), total_loss]
        self.peak_mb = 0.0

    def before_step(self):
        self.memory.reset()
        _synchronize(self.device)
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()

    def after_step(self):
        _synchronize(self.device)
        self.wall.append(time.perf_counter() - self._wall0)
        self.cpu.append(time.process_time() - self._cpu0)
        self.peak_mb = max(self.peak_mb, self.memory.peak_mb())
        total_loss = self.trainer.storage.latest().get("total_loss")
        if total_loss is not None:
            self.loss.append([self.trainer.iter + 1, float(total_loss[0])])


class ProgressPrinter(HookBase):
    """A ``[bench]`` line every ``period`` iterations and after each evaluation (runs after EvalHook)."""

    def __init__(self, label: str, clock: StepClock, period: int, eval_period: int):
        self.label = label
        self.clock = clock
        self.period = max(1, period)
        self.eval_period = eval_period

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self.period == 0 or done == 1:
            loss = self.clock.loss[-1][1] if self.clock.loss else float("nan")
            progress(f"{self.label}: iter {done}/{self.trainer.max_iter}  {self.clock.wall[-1]:.2f} s/iter  "
                     f"total_loss {loss:.3f}")
        if self.eval_period > 0 and done % self.eval_period == 0 and done != self.trainer.max_iter:
            self._print_eval(done)

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:  # finished: the final evaluation has run
            self._print_eval(self.trainer.max_iter)

    def _print_eval(self, done: int):
        latest = self.trainer.storage.latest()
        parts = [f"{key} {latest[key][0]:.2f}" for key in ("segm/AP", "bbox/AP") if key in latest]
        if parts:
            progress(f"{self.label}: eval at iter {done}: " + "  ".join(parts))


# Imported late: importing mnc_d2 registers the datasets and model parts.
def _trainer_class():
    from detectron2.engine import hooks

    from mnc_d2.engine import Trainer

    class BenchmarkTrainer(Trainer):
        """mnc_d2's Trainer with a step clock (the first of the default hooks) and progress lines.
        The Trainer's training stream is seeded from ``cfg.SEED``, so every model sees the same
        images in the same order with the same augmentation."""

        def __init__(self, cfg, memory: PeakMemory, label: str, print_period: int, timing_only: bool = False):
            self._memory = memory
            self._label = label
            self._print_period = print_period
            self._timing_only = timing_only  # time the steps only: no evaluation, no checkpoints
            super().__init__(cfg)

        def build_hooks(self):
            self.step_clock = StepClock(self._memory, self.cfg.MODEL.DEVICE)
            default_hooks = [h for h in super().build_hooks() if h is not None]
            assert any(isinstance(h, hooks.EvalHook) for h in default_hooks)
            if self._timing_only:
                default_hooks = [h for h in default_hooks
                                 if not isinstance(h, (hooks.EvalHook, hooks.PeriodicCheckpointer))]
            printer = ProgressPrinter(self._label, self.step_clock, self._print_period, self.cfg.TEST.EVAL_PERIOD)
            return [self.step_clock, *default_hooks, printer]

    return BenchmarkTrainer


# ---------------------------------------------------------------------------------------- datasets
def register_val_subset(source: str, num_images: int) -> str:
    """Register ``<source>_first<n>``: the first n images of a dataset. Its metadata has no
    ``json_file``, so COCOEvaluator builds the ground truth of exactly these images."""
    name = f"{source}_first{num_images}"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: DatasetCatalog.get(source)[:num_images])
        metadata = {k: v for k, v in MetadataCatalog.get(source).as_dict().items() if k not in ("name", "json_file")}
        MetadataCatalog.get(name).set(**metadata)
    return name


# ---------------------------------------------------------------------------------------- results
def _clean(value: float) -> Optional[float]:
    """JSON has no NaN: COCOEvaluator reports NaN when a model predicts nothing."""
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else round(value, 4)


def learning_curve(storage, max_iter: int) -> List[Dict]:
    """[{iter, segm: {AP, AP50, AP75}, bbox: {...}}] from the scalars EvalHook put into the storage.
    ``iter`` counts the iterations done: periodic evaluations are stored at the 0-based index of the
    step that triggered them, the final one (after_train) at max_iter.

    COCOEvaluator reports NaN when a model predicts nothing at all (early in training); COCO's own
    definition gives 0 then (every ground-truth instance missed), so the point gets AP 0 and
    ``no_predictions: True``."""
    by_iter: Dict[int, Dict] = {}
    for task in TASKS:
        for key in AP_KEYS:
            name = f"{task}/{key}"
            if name not in storage.histories():
                continue
            for value, iteration in storage.history(name).values():
                done = min(int(iteration) + 1, max_iter)
                entry = by_iter.setdefault(done, {"iter": done})
                value = _clean(value)
                if value is None:
                    entry["no_predictions"] = True
                entry.setdefault(task, {})[key] = 0.0 if value is None else value
    return [by_iter[i] for i in sorted(by_iter)]


def _summary(values: List[float]) -> Dict:
    return {"median": round(statistics.median(values), 5) if values else None,
            "mean": round(statistics.fmean(values), 5) if values else None,
            "min": round(min(values), 5) if values else None,
            "max": round(max(values), 5) if values else None}


# ---------------------------------------------------------------------------------------- inference
def measure_inference(trainer_cls, cfg, model, dataset_name: str, num_images: Optional[int], warmup: int,
                      memory: PeakMemory, device: str) -> Dict:
    """Median seconds per image of ``model([input])`` at batch 1 over the (first num_images) val images."""
    loader = trainer_cls.build_test_loader(cfg, dataset_name)  # batch 1, the test-time resize
    inputs = []
    for batch in loader:
        inputs.extend(batch)
        if num_images and len(inputs) >= num_images:
            break
    model.eval()
    wall, cpu, detections = [], [], []
    with torch.no_grad():
        for inp in inputs[:warmup]:
            model([inp])
        memory.reset()
        for inp in inputs:
            _synchronize(device)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            outputs = model([inp])
            _synchronize(device)
            wall.append(time.perf_counter() - wall0)
            cpu.append(time.process_time() - cpu0)
            detections.append(len(outputs[0]["instances"]))
    return {
        "num_images": len(inputs),
        "warmup_images": min(warmup, len(inputs)),
        "s_per_image": _summary(wall),
        "cpu_s_per_image": _summary(cpu),
        "detections_per_image_mean": round(statistics.fmean(detections), 2) if detections else 0.0,
        "peak_mb": round(memory.peak_mb(), 1),
    }


# ---------------------------------------------------------------------------------------- test-time variants
def measure_flops(cfg, model, dataset_name: str, num_images: int) -> Dict:
    """mnc_d2.analyze's FLOP count on the first ``num_images`` val images with these weights (eval mode)."""
    from detectron2.data import build_detection_test_loader
    from mnc_d2.tools.analyze import count_flops

    inputs = []
    for batch in build_detection_test_loader(cfg, dataset_name):
        inputs.extend(batch)
        if len(inputs) >= num_images:
            break
    was_training = model.training
    flops = count_flops(model, inputs[:num_images])
    model.train(was_training)
    return {**flops, "gflops_per_image": round(flops["eager_total"] / 1e9, 4)}


def evaluate_variant(trainer_cls, spec: Dict, variant_opts, state_dict: Dict, memory: PeakMemory,
                     device: str) -> Dict:
    """Evaluate and time the trained weights again with test-time config changes (e.g. mask voting
    off): the model is rebuilt from the changed config and gets the same state dict."""
    from mnc_d2.config import build_cfg

    name = "_".join(variant_opts[::2]).replace(".", "_").lower()
    out_dir = os.path.join(spec["work_dir"], "variants", name)
    cfg = build_cfg(spec["config_file"], [*spec["opts"], *variant_opts, "OUTPUT_DIR", out_dir])
    os.makedirs(out_dir, exist_ok=True)
    model = trainer_cls.build_model(cfg)
    model.load_state_dict(state_dict)
    model.eval()
    results = trainer_cls.test(cfg, model)  # {task: {AP, AP50, ...}} for one test dataset
    if len(cfg.DATASETS.TEST) > 1:
        results = results[cfg.DATASETS.TEST[0]]
    evaluation = {task: {key: _clean(results[task][key]) for key in AP_KEYS if key in results[task]}
                  for task in TASKS if task in results}
    inference = measure_inference(trainer_cls, cfg, model, cfg.DATASETS.TEST[0], spec["latency_images"],
                                  spec["latency_warmup"], memory, device)
    inference.pop("peak_mb")
    return {"opts": list(variant_opts), "eval": evaluation, "inference": inference}


# ---------------------------------------------------------------------------------------- profile
def _annotate(obj, attr: str, label: str) -> None:
    """Wrap ``obj.<attr>`` (a bound method) in a profiler range named ``label``."""
    from torch.profiler import record_function

    method = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        with record_function(label):
            return method(*args, **kwargs)

    setattr(obj, attr, wrapped)


def profile_model(trainer_cls, cfg, model, dataset_name: str, out_file: str) -> Dict:
    """torch.profiler over one training iteration (forward + backward) and one inference call.
    Returns seconds per labelled part; writes the top operators to ``out_file``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    _annotate(model.backbone, "forward", "part::backbone")
    _annotate(model.proposal_generator, "forward", "part::proposal_generator")
    _annotate(model.roi_heads, "forward", "part::roi_heads")
    for name, child in model.roi_heads.named_children():
        _annotate(child, "forward", f"part::roi_heads.{name}")
        if hasattr(child, "layers") and callable(child.layers):  # mask heads: MNC calls .layers directly
            _annotate(child, "layers", f"part::roi_heads.{name}.layers")

    train_batch = next(iter(trainer_cls.build_train_loader(cfg)))
    test_input = next(iter(trainer_cls.build_test_loader(cfg, dataset_name)))
    result, tables = {}, []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.MODEL.DEVICE.startswith("cuda") else [])
    for phase in ("train", "inference"):
        model.train(phase == "train")
        with EventStorage(0), profile(activities=activities) as prof:
            if phase == "train":
                with record_function("part::forward"):
                    loss = sum(model(train_batch).values())
                with record_function("part::backward"):
                    loss.backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad(), record_function("part::forward"):
                    model(test_input)
        averages = prof.key_averages()
        parts = {e.key[len("part::"):]: round(e.cpu_time_total / 1e6, 4)
                 for e in averages if e.key.startswith("part::")}
        # what the forward spends outside backbone, RPN and ROI heads: image preprocessing and, at
        # inference, post-processing (mask pasting; MNC's voting)
        parts["forward_other"] = round(parts.get("forward", 0.0) - sum(
            parts.get(k, 0.0) for k in ("backbone", "proposal_generator", "roi_heads")), 4)
        result[phase] = parts
        tables.append(f"==== {phase}: labelled parts (s, CPU time incl. children)\n"
                      + "\n".join(f"{k:45s} {v:8.3f}" for k, v in sorted(result[phase].items(), key=lambda kv: -kv[1]))
                      + f"\n==== {phase}: top operators by self CPU time\n"
                      + averages.table(sort_by="self_cpu_time_total", row_limit=25))
        if ProfilerActivity.CUDA in activities:  # on a GPU, what the device spends its time on
            tables.append(f"==== {phase}: top operators by self CUDA time\n"
                          + averages.table(sort_by="self_device_time_total", row_limit=25))
    with open(out_file, "w") as f:
        f.write("\n\n".join(tables))
    return result


# ---------------------------------------------------------------------------------------- settings
# Config keys every model of one benchmark must share (the comparison is about the ROI heads only).
SHARED_KEYS = ("MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.BACKBONE", "MODEL.RESNETS", "MODEL.FPN",
               "MODEL.ANCHOR_GENERATOR", "MODEL.PROPOSAL_GENERATOR", "MODEL.RPN", "MODEL.ROI_HEADS.NUM_CLASSES",
               "MODEL.ROI_HEADS.IN_FEATURES", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "INPUT", "DATASETS", "DATALOADER",
               "SOLVER", "TEST.EVAL_PERIOD", "TEST.DETECTIONS_PER_IMAGE", "SEED")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def config_snapshot(cfg) -> Dict:
    """The resolved config as {dotted key: value} (JSON types), OUTPUT_DIR left out: ``--resume`` compares a
    saved run's snapshot with its config as resolved today, so a changed default or config file retrains it."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
            else:
                flat[prefix + key] = value

    walk(cfg, "")
    flat.pop("OUTPUT_DIR", None)
    return json.loads(json.dumps(flat))  # tuples -> lists, as read back from result.json


# ... except the number of test RoIs each model's heads run on: a per-model cost choice (MNC's CPU configs: 200,
# the Mask R-CNN baseline: 300), recorded in each result's config snapshot.
PER_MODEL_KEYS = ("MODEL.RPN.POST_NMS_TOPK_TEST",)


def shared_settings_digest(cfg) -> str:
    shared = {key: _get(cfg, key) for key in SHARED_KEYS}
    shared["MODEL.RPN"] = {k: v for k, v in shared["MODEL.RPN"].items() if f"MODEL.RPN.{k}" not in PER_MODEL_KEYS}
    text = json.dumps(shared, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def describe_settings(cfg) -> Dict:
    import detectron2

    device = cfg.MODEL.DEVICE
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                device_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                   device_name)
        except OSError:
            pass
    resnets, fpn = cfg.MODEL.RESNETS, cfg.MODEL.FPN
    return {
        "backbone": f"ResNet-{resnets.DEPTH}-FPN ({fpn.OUT_CHANNELS} ch), {resnets.NORM or 'BN'}, "
                    + ("from scratch" if not cfg.MODEL.WEIGHTS else f"weights {cfg.MODEL.WEIGHTS}"),
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "train_dataset": cfg.DATASETS.TRAIN[0],
        "val_dataset": cfg.DATASETS.TEST[0],
        "num_val_images": len(DatasetCatalog.get(cfg.DATASETS.TEST[0])),
        "input": {"min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN), "min_size_test": cfg.INPUT.MIN_SIZE_TEST},
        "device_name": device_name,
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
    }


# ---------------------------------------------------------------------------------------- main
def run(spec: Dict) -> Dict:
    torch.set_num_threads(spec["threads"])
    import mnc_d2  # noqa: F401  (registers the datasets and the model parts)
    from mnc_d2.engine import setup_cfg

    result = {"name": spec["name"], "label": spec["label"], "config_file": spec["config_file"],
              "opts": spec["opts"], "status": "ok", "message": ""}
    if spec.get("val_subset"):
        register_val_subset(**spec["val_subset"])
    args = argparse.Namespace(config_file=spec["config_file"], opts=list(spec["opts"]), eval_only=False,
                              resume=False)
    cfg = setup_cfg(args)  # get_cfg -> add_mnc_config -> merge file -> merge opts -> default_setup (seeds)
    device = cfg.MODEL.DEVICE
    result["output_dir"] = cfg.OUTPUT_DIR
    result["settings"] = describe_settings(cfg)
    result["shared_settings_digest"] = shared_settings_digest(cfg)
    result["config"] = config_snapshot(cfg)
    memory = PeakMemory(device)
    trainer_cls = _trainer_class()
    try:
        trainer = trainer_cls(cfg, memory, spec["label"], spec["print_period"])
    except Exception as e:  # e.g. a five-stage head that cannot be built: skip this model, keep the others
        traceback.print_exc()
        result.update(status="skipped", message=f"building the model failed: {type(e).__name__}: {e}")
        progress(f"{spec['label']}: SKIPPED ({result['message']})")
        return result
    trainer.resume_or_load(resume=False)  # DetectionCheckpointer: MODEL.WEIGHTS ("" = from scratch)
    model = trainer.model
    result["num_parameters"] = sum(p.numel() for p in model.parameters())
    result["memory"] = {"method": memory.method, "resettable": memory.resettable,
                        "baseline_mb": round(memory.current_mb(), 1)}
    progress(f"{spec['label']}: {result['num_parameters'] / 1e6:.2f} M parameters; training {cfg.SOLVER.MAX_ITER} "
             f"iterations, evaluating every {cfg.TEST.EVAL_PERIOD or cfg.SOLVER.MAX_ITER}")

    start = time.perf_counter()
    clock = trainer.step_clock
    try:
        trainer.train()
    except Exception as e:  # e.g. diverged: report it with the loss curve so far, keep the other models
        traceback.print_exc()
        result.update(status="failed", message=f"training failed at iteration {len(clock.wall)}: "
                                               f"{type(e).__name__}: {e}")
        result["train"] = {"iters": len(clock.wall), "wall_s_per_iter_all": [round(t, 4) for t in clock.wall],
                           "loss": clock.loss}
        progress(f"{spec['label']}: FAILED ({result['message']})")
        return result
    warmup = min(spec["train_warmup"], max(0, len(clock.wall) - 1))
    result["train"] = {
        "iters": len(clock.wall),
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "warmup_iters": warmup,
        "timed_iters": len(clock.wall) - warmup,
        "s_per_iter": _summary(clock.wall[warmup:]),
        "cpu_s_per_iter": _summary(clock.cpu[warmup:]),
        "total_s": round(time.perf_counter() - start, 1),  # evaluations included
        "wall_s_per_iter_all": [round(t, 4) for t in clock.wall],
        "loss": clock.loss,
    }
    result["memory"]["train_peak_mb"] = round(clock.peak_mb, 1)
    curve = learning_curve(trainer.storage, cfg.SOLVER.MAX_ITER)
    result["eval"] = {"curve": curve, "final": {k: v for k, v in curve[-1].items() if k in TASKS} if curve else {}}

    val_name = cfg.DATASETS.TEST[0]
    progress(f"{spec['label']}: timing inference at batch 1 on {val_name}")
    inference = measure_inference(trainer_cls, cfg, model, val_name, spec["latency_images"], spec["latency_warmup"],
                                  memory, device)
    result["memory"]["inference_peak_mb"] = inference.pop("peak_mb")
    result["inference"] = inference
    if spec.get("flop_images"):
        result["flops"] = measure_flops(cfg, model, val_name, spec["flop_images"])
    progress(f"{spec['label']}: {result['train']['s_per_iter']['median']:.3f} s/iter, "
             f"{inference['s_per_image']['median']:.3f} s/image, peak {result['memory']['train_peak_mb']:.0f} MB, "
             f"segm AP {result['eval']['final'].get('segm', {}).get('AP')}")
    variants = spec.get("test_variants") or {}
    if variants and cfg.MODEL.META_ARCHITECTURE == "MNC":
        result["variants"] = {}
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, variant_opts in variants.items():
            progress(f"{spec['label']}: test-time variant {name} ({' '.join(variant_opts)}) on the same weights")
            result["variants"][name] = evaluate_variant(trainer_cls, spec, variant_opts, state, memory, device)
            final = result["variants"][name]["eval"].get("segm", {})
            progress(f"{spec['label']} [{name}]: {result['variants'][name]['inference']['s_per_image']['median']:.3f} "
                     f"s/image, segm AP {final.get('AP')}")
    if spec.get("profile"):
        profile_file = os.path.join(spec["work_dir"], "profile.txt")
        result["profile"] = profile_model(trainer_cls, cfg, model, val_name, profile_file)
        result["profile_file"] = profile_file
    if not spec.get("keep_checkpoints"):
        for name in os.listdir(cfg.OUTPUT_DIR):
            if name.endswith(".pth") or name == "last_checkpoint":
                os.remove(os.path.join(cfg.OUTPUT_DIR, name))
    return result


# ---------------------------------------------------------------------------------------- timing only
def time_model(spec: Dict) -> Dict:
    """``--time-only``: re-time a trained model's final weights (``<work_dir>/model_final.pth``): inference
    at batch 1 (and each test-time variant's), then ``timing_iters`` training steps from those weights
    (the first ``train_warmup`` left out). Nothing is evaluated or saved; the result has no AP."""
    torch.set_num_threads(spec["threads"])
    import mnc_d2  # noqa: F401
    from mnc_d2.engine import setup_cfg

    weights = os.path.join(spec["work_dir"], "model_final.pth")
    result = {"name": spec["name"], "label": spec["label"], "status": "ok", "message": "", "weights": weights}
    if not os.path.exists(weights):
        result.update(status="skipped", message=f"{weights} does not exist (train with --keep-checkpoints)")
        progress(f"{spec['label']}: SKIPPED ({result['message']})")
        return result
    if spec.get("val_subset"):
        register_val_subset(**spec["val_subset"])
    iters = spec["timing_iters"] + spec["train_warmup"]
    out_dir = os.path.join(spec["work_dir"], "timing")
    opts = [*spec["opts"], "OUTPUT_DIR", out_dir, "MODEL.WEIGHTS", weights, "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0"]
    cfg = setup_cfg(argparse.Namespace(config_file=spec["config_file"], opts=opts, eval_only=False, resume=False))
    device = cfg.MODEL.DEVICE
    memory = PeakMemory(device)
    trainer_cls = _trainer_class()
    trainer = trainer_cls(cfg, memory, spec["label"], spec["print_period"], timing_only=True)
    trainer.resume_or_load(resume=False)  # loads MODEL.WEIGHTS
    model = trainer.model
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    val_name = cfg.DATASETS.TEST[0]
    progress(f"{spec['label']}: timing inference at batch 1 on {val_name}")
    inference = measure_inference(trainer_cls, cfg, model, val_name, spec["latency_images"], spec["latency_warmup"],
                                  memory, device)
    result["memory"] = {"method": memory.method, "inference_peak_mb": inference.pop("peak_mb")}
    result["inference"] = inference
    if spec["mode"] == "time_inference":  # another round of --time-only --rounds: inference only
        return result
    if spec.get("flop_images"):
        result["flops"] = measure_flops(cfg, model, val_name, spec["flop_images"])
    result["variants"] = {}
    if cfg.MODEL.META_ARCHITECTURE == "MNC":
        from mnc_d2.config import build_cfg

        for name, variant_opts in (spec.get("test_variants") or {}).items():
            variant_cfg = build_cfg(spec["config_file"], [*opts, *variant_opts])
            variant_model = trainer_cls.build_model(variant_cfg)
            variant_model.load_state_dict(state)
            timing = measure_inference(trainer_cls, variant_cfg, variant_model, val_name, spec["latency_images"],
                                       spec["latency_warmup"], memory, device)
            timing.pop("peak_mb")
            result["variants"][name] = {"opts": list(variant_opts), "inference": timing}
    progress(f"{spec['label']}: timing {iters} training iterations from the final weights")
    model.train()
    trainer.train()
    clock = trainer.step_clock
    warmup = min(spec["train_warmup"], max(0, len(clock.wall) - 1))
    result["train"] = {"iters": len(clock.wall), "warmup_iters": warmup, "timed_iters": len(clock.wall) - warmup,
                       "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "s_per_iter": _summary(clock.wall[warmup:]),
                       "cpu_s_per_iter": _summary(clock.cpu[warmup:])}
    result["memory"]["train_peak_mb"] = round(clock.peak_mb, 1)
    progress(f"{spec['label']}: {result['train']['s_per_iter']['median']:.3f} s/iter, "
             f"{inference['s_per_image']['median']:.3f} s/image")
    return result


def reevaluate(spec: Dict) -> Dict:
    """``--resume`` after a test-time setting changed: evaluate and time the kept final weights with today's
    config (and its test-time variants). The saved result (``spec["previous_result"]``) keeps its training
    part; its final evaluation moves to ``reevaluated.previous_final`` and the curve's last point is replaced."""
    torch.set_num_threads(spec["threads"])
    import mnc_d2  # noqa: F401
    from detectron2.checkpoint import DetectionCheckpointer
    from mnc_d2.config import build_cfg

    result = copy.deepcopy(spec["previous_result"])
    if spec.get("val_subset"):
        register_val_subset(**spec["val_subset"])
    out_dir = os.path.join(spec["work_dir"], "reevaluated")
    cfg = build_cfg(spec["config_file"], [*spec["opts"], "OUTPUT_DIR", out_dir])
    memory = PeakMemory(cfg.MODEL.DEVICE)
    trainer_cls = _trainer_class()
    model = trainer_cls.build_model(cfg)
    DetectionCheckpointer(model).load(os.path.join(spec["work_dir"], "model_final.pth"))
    model.eval()
    progress(f"{spec['label']}: evaluating the kept final weights again")
    results = trainer_cls.test(cfg, model)
    if len(cfg.DATASETS.TEST) > 1:
        results = results[cfg.DATASETS.TEST[0]]
    final = {task: {key: _clean(results[task][key]) for key in AP_KEYS if key in results[task]}
             for task in TASKS if task in results}
    curve = result["eval"]["curve"]
    if curve and curve[-1]["iter"] == cfg.SOLVER.MAX_ITER:
        curve[-1] = {"iter": cfg.SOLVER.MAX_ITER, **final}
    result["reevaluated"] = {"changed": spec["changed_keys"],
                             "previous_final": result["eval"]["final"]}
    result["eval"]["final"] = final
    result["config"] = config_snapshot(cfg)
    inference = measure_inference(trainer_cls, cfg, model, cfg.DATASETS.TEST[0], spec["latency_images"],
                                  spec["latency_warmup"], memory, cfg.MODEL.DEVICE)
    result["memory"]["inference_peak_mb"] = inference.pop("peak_mb")
    result["inference"] = inference
    if spec.get("flop_images"):
        result["flops"] = measure_flops(cfg, model, cfg.DATASETS.TEST[0], spec["flop_images"])
    if spec.get("test_variants") and cfg.MODEL.META_ARCHITECTURE == "MNC":
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result["variants"] = {name: evaluate_variant(trainer_cls, spec, opts, state, memory, cfg.MODEL.DEVICE)
                              for name, opts in spec["test_variants"].items()}
    progress(f"{spec['label']}: segm AP {final.get('segm', {}).get('AP')} (was "
             f"{result['reevaluated']['previous_final'].get('segm', {}).get('AP')})")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="JSON spec written by run_benchmark.py")
    spec_file = parser.parse_args(argv).spec
    with open(spec_file) as f:
        spec = json.load(f)
    try:
        result = {"time": time_model, "time_inference": time_model, "evaluate": reevaluate}.get(spec.get("mode"), run)(spec)
    except Exception as e:
        traceback.print_exc()
        result = {"name": spec["name"], "label": spec["label"], "status": "failed",
                  "message": f"{type(e).__name__}: {e}"}
        progress(f"{spec['label']}: FAILED ({result['message']})")
    with open(spec["result_file"], "w") as f:
        json.dump(result, f, indent=1)
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
