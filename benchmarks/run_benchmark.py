#!/usr/bin/env python
"""MNC (three- and five-stage) against Detectron2's stock Mask R-CNN, side by side, in one run.

    python -m benchmarks.run_benchmark                          # shapes, default CPU size (about 30 min)
    python -m benchmarks.run_benchmark --size tiny              # a smoke run of about a minute
    python -m benchmarks.run_benchmark --dataset hela --models mnc3,maskrcnn
    python -m benchmarks.run_benchmark --models ablation --iters 300 --eval-period 100   # README ablation
    python -m benchmarks.run_benchmark --size large --device cuda --out /tmp/bench
    python -m benchmarks.run_benchmark --seeds 2,3,4 --models mnc3,maskrcnn  # mean ± std over seeds
    python benchmarks/run_benchmark.py ... SOLVER.BASE_LR 0.01  # trailing KEY VALUE pairs go to every model

Every model is trained and evaluated with the same backbone, input size, data, schedule and seed
(the MNC CPU config; Mask R-CNN's config inherits it and changes only the ROI heads), each in its
own subprocess (``worker.py``) so that peak memory and thread pools are measured per model.
Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` to ``--out`` (default
``benchmarks/results/<dataset>`` for the default size, ``<dataset>_<size>`` for the others), plus
each model's Detectron2 log, config and metrics under ``<out>/runs/<model>/``.

After training, every MNC model is also evaluated and timed on its final weights with test-time
variants (``--variants``: mask voting off, 100 test proposals), which gives the ablation table:
``--models ablation`` trains {3, 5 stages} x {box gradients off, on} plus Mask R-CNN.
"""
import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report, seeds  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    label: str
    configs: Dict[str, str]  # dataset -> config file (relative to the repository)
    opts: tuple = ()


MODELS = {
    "mnc3": ModelSpec("MNC 3-stage", {"shapes": "configs/mnc_R18_GN_FPN_shapes_cpu.yaml",
                                      "hela": "configs/benchmark/mnc_R18_GN_FPN_hela_cpu.yaml"},
                      ("MODEL.MNC.NUM_STAGES", "3")),
    "mnc5": ModelSpec("MNC 5-stage", {"shapes": "configs/mnc_R18_GN_FPN_shapes_cpu.yaml",
                                      "hela": "configs/benchmark/mnc_R18_GN_FPN_hela_cpu.yaml"},
                      ("MODEL.MNC.NUM_STAGES", "5")),
    # box gradients clipped at 1.0 (the first default): box-coordinate gradients are ~1e-5 (median) on this
    # config, so this clip never acts; both models collapsed in the README's ablation
    "mnc3_bg": ModelSpec("MNC 3-stage, box gradients", {"shapes": "configs/mnc_R18_GN_FPN_shapes_cpu.yaml",
                                                         "hela": "configs/benchmark/mnc_R18_GN_FPN_hela_cpu.yaml"},
                         ("MODEL.MNC.NUM_STAGES", "3", "MODEL.MNC.BOX_GRADIENTS.ENABLED", "True",
                          "MODEL.MNC.BOX_GRADIENTS.CLIP", "1.0")),
    "mnc5_bg": ModelSpec("MNC 5-stage, box gradients", {"shapes": "configs/mnc_R18_GN_FPN_shapes_cpu.yaml",
                                                         "hela": "configs/benchmark/mnc_R18_GN_FPN_hela_cpu.yaml"},
                         ("MODEL.MNC.NUM_STAGES", "5", "MODEL.MNC.BOX_GRADIENTS.ENABLED", "True",
                          "MODEL.MNC.BOX_GRADIENTS.CLIP", "1.0")),
    # box gradients with a clip that binds (the default since): each coordinate's gradient becomes a
    # sign-like step 10x below the median
    "mnc3_bg_clip": ModelSpec("MNC 3-stage, box gradients clipped at 1e-6",
                              {"shapes": "configs/mnc_R18_GN_FPN_shapes_cpu.yaml",
                               "hela": "configs/benchmark/mnc_R18_GN_FPN_hela_cpu.yaml"},
                              ("MODEL.MNC.NUM_STAGES", "3", "MODEL.MNC.BOX_GRADIENTS.ENABLED", "True",
                               "MODEL.MNC.BOX_GRADIENTS.CLIP", "1e-6")),
    # box gradients bounded as the authors bound them (the paper config's setting), three stages
    "mnc3_bg_delta": ModelSpec("MNC 3-stage, box gradients (delta bound 1/512)",
                               {"shapes": "configs/mnc_R18_GN_FPN_shapes_cpu.yaml",
                                "hela": "configs/benchmark/mnc_R18_GN_FPN_hela_cpu.yaml"},
                               ("MODEL.MNC.NUM_STAGES", "3", "MODEL.MNC.BOX_GRADIENTS.ENABLED", "True",
                                "MODEL.MNC.BOX_GRADIENTS.CLIP", "0.0", "MODEL.MNC.BOX_GRADIENTS.DELTA_CLIP",
                                "0.001953125")),
    "maskrcnn": ModelSpec("Mask R-CNN", {"shapes": "configs/benchmark/maskrcnn_R18_GN_FPN_shapes_cpu.yaml",
                                         "hela": "configs/benchmark/maskrcnn_R18_GN_FPN_hela_cpu.yaml"}),
}

PAPER_CONFIGS = {"shapes": "configs/mnc_R18_GN_FPN_shapes_cpu_paper.yaml",
                 "hela": "configs/benchmark/mnc_R18_GN_FPN_hela_cpu_paper.yaml"}
# D2's mask head, class-agnostic and CPU-narrowed as in the Mask R-CNN baseline: 4 convs x 64 -> 28x28
_CONV_HEAD = ("MODEL.ROI_MASK_HEAD.NUM_CONV", "4", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
              "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "True")
# The cascade ablation (docs/benchmarks/ablation.md): the paper config, then each switch alone on top of it.
CASCADE_ABLATION = {
    "paper": ("MNC paper config", ()),
    "paper_3stage": ("paper, 3 stages", ("MODEL.MNC.NUM_STAGES", "3")),
    "paper_no_gating": ("paper, gating off", ("MODEL.MNC.SEGMENT_GATING", "False")),
    "paper_no_segcls": ("paper, segment classifier off", ("MODEL.MNC.SEGMENT_CLASSIFIER.ENABLED", "False")),
    "paper_no_boxgrad": ("paper, box gradients off", ("MODEL.MNC.BOX_GRADIENTS.ENABLED", "False")),
    "paper_diff_targets": ("paper, differentiable box targets",
                           ("MODEL.MNC.BOX_GRADIENTS.DIFFERENTIABLE_TARGETS", "True")),
    "paper_rois256": ("paper, 256 RoIs/image", ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "256")),
    "paper_convhead": ("paper, D2 conv mask head (28x28)",
                       ("MODEL.MNC.MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", *_CONV_HEAD)),
    "paper_maskconv3": ("paper, FC head + 3x3 conv", ("MODEL.MNC.MASK_HEAD.NUM_CONV", "1")),
    "paper_maskconv1": ("paper, FC head + 1x1 conv", ("MODEL.MNC.MASK_HEAD.NUM_CONV", "1",
                                                      "MODEL.MNC.MASK_HEAD.CONV_KERNEL", "1")),
    # not a switch of the model: D2's gradient clip (each parameter's gradient norm <= 5), to test whether
    # the paper config's divergence at our learning rate (docs/benchmarks/ablation.md) is a step-size problem
    "paper_clipgrad": ("paper, + D2 gradient clip (norm 5 per parameter)",
                       ("SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
                        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "5.0")),
    "paper_finalhead": ("paper, + conv mask head on final boxes",
                        ("MODEL.MNC.FINAL_MASK_HEAD.ENABLED", "True", "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER", "False",
                         *_CONV_HEAD, "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", "True")),
}
MODELS.update({name: ModelSpec(label, PAPER_CONFIGS, opts) for name, (label, opts) in CASCADE_ABLATION.items()})
# Candidates for MNC's default (issue "MNC's default beats Mask R-CNN"): today's 3- / 5-stage model with D2's
# conv mask head in the cascade, or with the cheap head in the cascade and the conv head on the final boxes only
_MNC_CONFIGS = MODELS["mnc3"].configs
MODELS.update({
    "mnc3_conv": ModelSpec("MNC 3-stage, D2 conv mask head (28x28)", _MNC_CONFIGS,
                           ("MODEL.MNC.NUM_STAGES", "3", "MODEL.MNC.MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
                            *_CONV_HEAD)),
    "mnc5_conv": ModelSpec("MNC 5-stage, D2 conv mask head (28x28)", _MNC_CONFIGS,
                           ("MODEL.MNC.NUM_STAGES", "5", "MODEL.MNC.MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
                            *_CONV_HEAD)),
    "mnc3_conv_refined": ModelSpec("MNC 3-stage, D2 conv mask head, also trained on the regressed boxes", _MNC_CONFIGS,
                                   ("MODEL.MNC.NUM_STAGES", "3", "MODEL.MNC.MASK_HEAD.NAME",
                                    "MaskRCNNConvUpsampleHead", *_CONV_HEAD, "MODEL.MNC.REFINED_MASK_LOSS", "True")),
    # the cascade on cheap 7x7 RoI features and the paper's FC mask head, D2's conv head on the final boxes only
    # (its own 14x14 RoIAlign, also trained on the regressed boxes): Mask R-CNN's mask compute on MNC's cascade
    "mnc3_fast": ModelSpec("MNC 3-stage, 7x7 cascade + conv mask head on final boxes", _MNC_CONFIGS,
                           ("MODEL.MNC.NUM_STAGES", "3", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7",
                            "MODEL.MNC.PATHWAY_POOL", "1", "MODEL.MNC.MASK_HEAD.NUM_CONV", "0",
                            "MODEL.MNC.FINAL_MASK_HEAD.ENABLED", "True", *_CONV_HEAD,
                            "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "14", "MODEL.MNC.REFINED_MASK_LOSS", "True",
                            "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", "True", "MODEL.MNC.TEST.MASK_VOTING", "False")),
    "mnc3_finalhead": ModelSpec("MNC 3-stage, + conv mask head on final boxes", _MNC_CONFIGS,
                                ("MODEL.MNC.NUM_STAGES", "3", "MODEL.MNC.FINAL_MASK_HEAD.ENABLED", "True",
                                 "MODEL.MNC.FINAL_MASK_HEAD.OWN_POOLER", "False", *_CONV_HEAD,
                                 "MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES",
                                 "True")),
})

# What the cascade adds: MNC's default at D2's RoI settings, the controls that take parts of the
# cascade away, and Mask R-CNN given MNC's recipe (64 RoIs at 30 % foreground, 200 test proposals; with and
# without MNC's hard-background sampling)
_MNC_RECIPE = ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.3",
               "MODEL.RPN.POST_NMS_TOPK_TEST", "200")
MODELS.update({
    "mnc_d2roi": ModelSpec("MNC's default at D2's RoI settings (512 RoIs, 25 % fg, 1000 test proposals)",
                           _MNC_CONFIGS, ("MODEL.MNC.NUM_STAGES", "3", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512",
                                          "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.25",
                                          "MODEL.RPN.POST_NMS_TOPK_TEST", "1000")),
    "mnc3_norefined": ModelSpec("MNC's default without the refined-mask loss", _MNC_CONFIGS,
                                ("MODEL.MNC.NUM_STAGES", "3", "MODEL.MNC.REFINED_MASK_LOSS", "False")),
    "mnc3_nocascade": ModelSpec("MNC's default without the cascade (no segment pathway, stage-2 mask loss 0)",
                                _MNC_CONFIGS, ("MODEL.MNC.NUM_STAGES", "3", "MODEL.MNC.SEGMENT_PATHWAY", "False",
                                               "MODEL.MNC.MASK_LOSS_WEIGHT", "0.0")),
    "maskrcnn_mncrecipe": ModelSpec("Mask R-CNN with MNC's recipe (64 RoIs, 30 % fg, 200 test proposals)",
                                    MODELS["maskrcnn"].configs, _MNC_RECIPE),
    "maskrcnn_mncrecipe_hardbg": ModelSpec("Mask R-CNN with MNC's recipe and hard-background sampling",
                                           MODELS["maskrcnn"].configs,
                                           (*_MNC_RECIPE, "MODEL.ROI_HEADS.NAME", "HardBackgroundROIHeads")),
})

# --models shorthands. "ablation" is the {3, 5 stages} x {box gradients off, on} grid of the README (mask
# voting on/off is a test-time variant of each), with Mask R-CNN for the ratios.
MODEL_GROUPS = {
    "default": ("mnc3", "mnc5", "maskrcnn"),
    "ablation": ("mnc3", "mnc3_bg", "mnc5", "mnc5_bg", "maskrcnn"),
    "cascade": (*CASCADE_ABLATION, "maskrcnn"),
    "controls": ("mnc_d2roi", "mnc3", "mnc3_norefined", "mnc3_nocascade", "maskrcnn_mncrecipe",
                 "maskrcnn_mncrecipe_hardbg", "maskrcnn"),
}

# Test-time variants: after training, each MNC model is evaluated and timed again on the same weights
# with these config changes (no retraining). --variants chooses them.
TEST_VARIANTS = {
    "no_voting": ("MODEL.MNC.TEST.MASK_VOTING", "False"),  # paste each kept mask in its own box
    "rpn100": ("MODEL.RPN.POST_NMS_TOPK_TEST", "100"),  # 100 test proposals instead of 300: speed vs AP
    "final_boxes": ("MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", "True"),  # output masks re-predicted on final boxes
    "final_boxes_no_voting": ("MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", "True", "MODEL.MNC.TEST.MASK_VOTING", "False"),
    # and Mask R-CNN's box NMS (0.5; MNC's 0.3 may suppress touching objects)
    "final_boxes_no_voting_nms05": ("MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES", "True", "MODEL.MNC.TEST.MASK_VOTING",
                                    "False", "MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.5"),
}

# dataset -> size -> (train, val). The tiny shapes splits are the instant test's; HeLa is small already.
DATASETS = {
    "shapes": {"tiny": ("mnc_shapes_tiny_train", "mnc_shapes_tiny_val"),
               "default": ("mnc_shapes_train", "mnc_shapes_val"),
               "gpu": ("mnc_shapes_train", "mnc_shapes_val"),
               "large": ("mnc_shapes_train", "mnc_shapes_val")},
    "hela": {"tiny": ("hela_nuclei_train", "hela_nuclei_val"),
             "default": ("hela_nuclei_train", "hela_nuclei_val"),
             "gpu": ("hela_nuclei_train", "hela_nuclei_val"),
             "large": ("hela_nuclei_train", "hela_nuclei_val")},
}


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    iters: int  # training iterations per model
    eval_period: int  # evaluate every this many iterations (and at the end)
    train_warmup: int  # iterations left out of the time per iteration
    val_images: Optional[int]  # evaluate on the first n val images (None: all)
    latency_images: Optional[int]  # time inference on the first n val images (None: all)
    latency_warmup: int  # untimed inference calls first
    print_period: int  # a progress line every n iterations
    opts: tuple = ()  # config changes for this size, applied to every model alike


def _input_size_opts(short_side: int, max_size: int) -> tuple:
    """One input scale for training and test: shorter side ``short_side``, longer side at most ``max_size``."""
    return ("INPUT.MIN_SIZE_TRAIN", f"({short_side},)", "INPUT.MAX_SIZE_TRAIN", str(max_size),
            "INPUT.MIN_SIZE_TEST", str(short_side), "INPUT.MAX_SIZE_TEST", str(max_size))


SIZES = {
    # CI: a handful of iterations at 160 px on 4 val images (the instant test's reductions)
    "tiny": SizeSpec(iters=3, eval_period=2, train_warmup=1, val_images=4, latency_images=4, latency_warmup=1,
                     print_period=1, opts=(
                         *_input_size_opts(160, 256),
                         "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
                         "MODEL.RPN.PRE_NMS_TOPK_TEST", "300", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
                         "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0")),
    # 2 CPU cores, all three models in about 30 min: the CPU config's model, input and batch, a short schedule
    "default": SizeSpec(iters=160, eval_period=40, train_warmup=10, val_images=None, latency_images=50,
                        latency_warmup=3, print_period=10),
    # benchmarks/gpu_check.sh: R50-FPN-GN from scratch at 800 px, batch 8 with AMP, a few timed iterations;
    # everything is kept as a candidate at test time so that barely trained models run their mask paths
    "gpu": SizeSpec(iters=40, eval_period=40, train_warmup=10, val_images=20, latency_images=20, latency_warmup=3,
                    print_period=10, opts=(
                        "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
                        "MODEL.FPN.OUT_CHANNELS", "256", "MODEL.ROI_BOX_HEAD.FC_DIM", "1024",
                        "MODEL.ROI_MASK_HEAD.CONV_DIM", "256", "MODEL.MNC.MASK_HEAD.CONV_DIM", "256",
                        *_input_size_opts(800, 1333),
                        "SOLVER.IMS_PER_BATCH", "8", "SOLVER.AMP.ENABLED", "True", "DATALOADER.NUM_WORKERS", "4",
                        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "100")),
    # one GPU: a longer schedule, twice the batch
    "large": SizeSpec(iters=3000, eval_period=500, train_warmup=20, val_images=None, latency_images=None,
                      latency_warmup=5, print_period=50,
                      opts=("SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_WORKERS", "4")),
}


def schedule_opts(iters: int, eval_period: int) -> List[str]:
    """The CPU config's schedule shape for ``iters`` iterations: LR drops at 75% and 92%, its 50
    warm-up iterations (at most 1/6 of a short run), a checkpoint only at the end."""
    steps = tuple(sorted({max(1, round(iters * 0.75)), max(1, round(iters * 0.92))} - {iters}))
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps),
            "SOLVER.WARMUP_ITERS", str(min(50, max(1, iters // 6))),
            "SOLVER.CHECKPOINT_PERIOD", str(iters + 1),
            "TEST.EVAL_PERIOD", str(eval_period)]


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_description() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit or "unknown") + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="shapes")
    parser.add_argument("--models", default="default",
                        help=f"comma-separated, run in this order; known: {','.join(MODELS)}; or a group: "
                             + "; ".join(f"{k} = {','.join(v)}" for k, v in MODEL_GROUPS.items()))
    parser.add_argument("--variants", default=",".join(TEST_VARIANTS),
                        help="test-time variants evaluated on each trained MNC model's weights (comma-separated, "
                             f"'none' for none); known: " + "; ".join(f"{k} = {' '.join(v)}"
                                                                       for k, v in TEST_VARIANTS.items()))
    parser.add_argument("--size", choices=list(SIZES), default="default",
                        help="tiny: CI smoke run; default: 2 CPU cores, ~30 min in all; large: GPU")
    parser.add_argument("--iters", type=int, help="training iterations per model (default: per --size)")
    parser.add_argument("--eval-period", type=int, help="evaluate every N iterations (default: per --size)")
    parser.add_argument("--val-images", type=int, help="evaluate on the first N val images (default: per --size)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch.set_num_threads for every model (default: the CPUs this process may use)")
    parser.add_argument("--seed", type=int, default=1, help="cfg.SEED of every model")
    parser.add_argument("--budget-s", type=float, default=0,
                        help="skip the models not started after this many seconds (0: no budget); the outputs "
                             "are written after every model either way")
    parser.add_argument("--profile-models", default="",
                        help="comma-separated models to profile as with --profile (e.g. mnc3), the others not")
    parser.add_argument("--seeds", default="",
                        help="comma-separated seeds, e.g. 2,3,4: one run per seed into <out>/seed<N>/ (each as with "
                             "--seed N), then <out>/benchmark.{json,md}: mean ± std per model, ratios from the means")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--profile", action="store_true",
                        help="also torch.profiler one training iteration and one inference call per model "
                             "(<out>/runs/<model>/profile.txt)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the result of every model of --out that already finished ok with the same spec "
                             "(config, options, measurement settings); run only the others (e.g. after a failure). "
                             "A model whose config changed only in test-time keys (*_TEST, TEST.*, MODEL.MNC.TEST.*) "
                             "and whose model_final.pth was kept is evaluated and timed again, not retrained")
    parser.add_argument("--keep-diverged", action="store_true",
                        help="with --resume: also reuse a model whose training diverged (NaN/Inf), instead of "
                             "training it again")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each model's model_final.pth")
    parser.add_argument("--time-only", action="store_true",
                        help="train nothing: re-time the final weights (model_final.pth, from a run with "
                             "--keep-checkpoints) of every --models model of --out back to back, inference (and the "
                             "--variants test-time variants; 'none': the model as configured only) and --timing-iters "
                             "training steps; writes timing.{json,md} with "
                             "ratios to Mask R-CNN. KEY VALUE opts apply on top of each model's saved config (e.g. a "
                             "test-time setting to time on the same weights)")
    parser.add_argument("--timing-iters", type=int, default=20, help="--time-only: timed training steps per model")
    parser.add_argument("--rounds", type=int, default=1,
                        help="--time-only: time inference in this many rounds over the models, the order reversed "
                             "every other round, so that the machine's drift hits every model alike; a model's "
                             "s/image is then the median of its rounds' medians")
    parser.add_argument("--flop-images", type=int, default=5,
                        help="--time-only: val images for each model's FLOP count (mnc_d2.analyze); 0 = none")
    parser.add_argument("--verbose", action="store_true", help="echo the models' full Detectron2 logs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE config pairs applied to every model (after all of the above)")
    args = parser.parse_args(argv)
    args.models = [m for part in args.models.split(",") if part.strip()
                   for m in MODEL_GROUPS.get(part.strip(), (part.strip(),))]
    args.variants = [] if args.variants.strip() in ("", "none") else [
        v.strip() for v in args.variants.split(",") if v.strip()]
    bad_variants = [v for v in args.variants if v not in TEST_VARIANTS]
    if bad_variants:
        parser.error(f"unknown --variants {bad_variants}; known: {list(TEST_VARIANTS)}")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"unknown --models {unknown}; known: {list(MODELS)}")
    if len(args.opts) % 2:
        parser.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    args.profile_models = [m.strip() for m in args.profile_models.split(",") if m.strip()]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if args.rounds < 1 or (args.rounds > 1 and not args.time_only):
        parser.error("--rounds N (N >= 1) goes with --time-only")
    if args.seeds and args.time_only:
        parser.error("--time-only times one set of weights in one invocation: give --out <out>/seed<N>, not --seeds")
    size = SIZES[args.size]
    args.iters = args.iters or size.iters
    args.eval_period = size.eval_period if args.eval_period is None else args.eval_period
    args.val_images = size.val_images if args.val_images is None else args.val_images
    suffix = "" if args.size == "default" else f"_{args.size}"
    args.out = os.path.abspath(args.out or os.path.join(REPO, "benchmarks", "results", args.dataset + suffix))
    return args


def model_spec(name: str, args, work_dir: str) -> Dict:
    """The worker's input: config file + opts (model, data, size, schedule, user) + measurement settings."""
    model, size = MODELS[name], SIZES[args.size]
    train, val = DATASETS[args.dataset][args.size]
    val_subset = None
    if args.val_images:
        val_subset = {"source": val, "num_images": args.val_images}
        val = f"{val}_first{args.val_images}"  # registered by the worker
    opts = [*model.opts,
            "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
            *size.opts, *schedule_opts(args.iters, args.eval_period),
            "SEED", str(args.seed), "MODEL.DEVICE", args.device, "OUTPUT_DIR", work_dir,
            *[str(o) for o in args.opts]]
    return {
        "name": name, "label": model.label, "config_file": os.path.join(REPO, model.configs[args.dataset]),
        "opts": opts, "threads": args.threads, "work_dir": work_dir, "val_subset": val_subset,
        "train_warmup": size.train_warmup, "latency_images": size.latency_images,
        "latency_warmup": size.latency_warmup, "print_period": size.print_period,
        "profile": args.profile or name in args.profile_models,
        "keep_checkpoints": args.keep_checkpoints, "result_file": os.path.join(work_dir, "result.json"),
        "test_variants": {v: list(TEST_VARIANTS[v]) for v in args.variants},
    }


def run_worker(spec: Dict, verbose: bool) -> Dict:
    """Run worker.py on ``spec`` in a fresh process; echo its progress; return its result."""
    os.makedirs(spec["work_dir"], exist_ok=True)
    # the training spec stays in spec.json (--resume compares it); a --time-only spec goes beside it
    spec_file = os.path.join(spec["work_dir"], {"time": "timing_spec.json", "time_inference": "timing_round_spec.json",
                                                "evaluate": "reevaluate_spec.json"}.get(spec.get("mode"), "spec.json"))
    with open(spec_file, "w") as f:
        json.dump(spec, f, indent=1)
    if os.path.exists(spec["result_file"]):
        os.remove(spec["result_file"])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
    log_file = os.path.join(spec["work_dir"], "worker.log")
    with open(log_file, "w", buffering=1) as log, subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", spec_file], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            log.write(line)
            if verbose or line.startswith("[bench]"):
                print(line, end="", flush=True)
    if os.path.exists(spec["result_file"]):
        with open(spec["result_file"]) as f:
            return json.load(f)
    with open(log_file) as f:
        tail = f.read()[-2000:]
    print(tail, file=sys.stderr)
    return {"name": spec["name"], "label": spec["label"], "status": "failed",
            "message": f"worker exited with code {proc.returncode} without a result; see {log_file}"}


def _portable(spec: Dict) -> str:
    """The spec with the repository and the run folder written as placeholders, so that results committed
    from another checkout (or moved with their --out folder) are still recognised by --resume."""
    out_dir = os.path.dirname(os.path.dirname(spec["work_dir"]))  # <out>/runs/<model>
    text = json.dumps(spec, sort_keys=True)
    for path, placeholder in ((spec["work_dir"], "<work_dir>"), (out_dir, "<out>"), (spec["config_file"].split(
            "/configs/")[0], "<repo>")):
        text = text.replace(path, placeholder)
    return text


def in_this_checkout(config_file: str) -> str:
    """A saved spec's config file in this checkout: runs made in (or copied from) another clone name its path,
    and timing them with that clone's configs would time what that clone's configs say."""
    _, sep, relative = config_file.partition("/configs/")
    return os.path.join(REPO, "configs", relative) if sep else config_file


def resolved_config(spec: Dict) -> Dict:
    """``spec``'s config file + opts resolved now, as the worker's ``config_snapshot``."""
    from benchmarks.worker import config_snapshot  # imports detectron2: only when --resume finds a saved run
    from mnc_d2.config import build_cfg

    import mnc_d2  # noqa: F401  (registers the model parts the config names)
    return config_snapshot(build_cfg(spec["config_file"], list(spec["opts"])))


def _upgraded_snapshot(snapshot: Dict) -> Dict:
    """A flat snapshot (dotted keys) of config format 1 in today's format (mnc_d2.config.upgrade_config_dict)."""
    from mnc_d2.config import upgrade_config_dict

    nested: Dict = {}
    for key, value in snapshot.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if not upgrade_config_dict(nested):
        return snapshot

    def flat(node, prefix=""):
        for key, value in node.items():
            yield from flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]
    return dict(flat(nested))


def config_changes(saved: Dict, current: Dict) -> List[str]:
    """Keys whose value differs between a saved snapshot and today's; a key only one side has (added or
    removed since) is not a change of this run's model, nor is MODEL.MNC.* for another meta-architecture
    (Mask R-CNN inherits the MNC CPU config, whose MNC defaults it never reads)."""
    saved = _upgraded_snapshot(saved)
    mnc = "MNC" in (saved.get("MODEL.META_ARCHITECTURE"), current.get("MODEL.META_ARCHITECTURE"))
    return sorted(k for k in saved.keys() & current.keys()
                  if saved[k] != current[k] and (mnc or not k.startswith("MODEL.MNC.")))


def reusable_result(spec: Dict, diverged_too: bool = False) -> Optional[Dict]:
    """With --resume: the saved result of ``spec``'s model if it finished ok with exactly this spec and, where
    the result holds a config snapshot, the same resolved config (a default or config file changed since
    retrains it). With ``diverged_too``, also a training that failed by diverging: a deterministic outcome,
    not a crash."""
    spec_file = os.path.join(spec["work_dir"], "spec.json")
    try:
        with open(spec_file) as f:
            saved_spec = json.load(f)
        with open(spec["result_file"]) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    diverged = result.get("status") == "failed" and "training failed at iteration" in result.get("message", "") \
        and ("Non-finite" in result["message"] or "diverged" in result["message"])
    if not (result.get("status") == "ok" or (diverged_too and diverged)):
        return None
    if _portable(saved_spec) != _portable(json.loads(json.dumps(spec))):
        return None
    if "config" in result:
        changed = config_changes(result["config"], resolved_config(spec))
        weights = os.path.join(spec["work_dir"], "model_final.pth")
        if changed and all(map(is_test_time_key, changed)) and result.get("status") == "ok" and os.path.exists(weights):
            result["reevaluate"] = changed  # the training is still valid: evaluate its kept weights again
            return result
        if changed:
            print(f"[bench] {spec['name']}: not reused, its resolved config changed since it was trained: "
                  f"{', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}", flush=True)
            return None
    result["reused"] = True
    return result


def is_test_time_key(key: str) -> bool:
    """A config key that only inference reads (e.g. MODEL.RPN.POST_NMS_TOPK_TEST, MODEL.MNC.TEST.*): a change
    leaves the training as it was, so --resume re-evaluates the kept weights instead of training again."""
    return (key.endswith("_TEST") or key.startswith("MODEL.MNC.TEST.")
            or (key.startswith("TEST.") and key != "TEST.EVAL_PERIOD"))


def reevaluate(spec: Dict, saved: Dict, verbose: bool) -> Dict:
    """Evaluate and time the saved run's final weights with today's config (worker mode "evaluate"); the
    saved result keeps its training part. On failure the saved result.json is left as it was."""
    spec = dict(spec, mode="evaluate", changed_keys=saved["reevaluate"],
                previous_result={k: v for k, v in saved.items() if k != "reevaluate"},
                result_file=os.path.join(spec["work_dir"], "reevaluated_result.json"))
    result = run_worker(spec, verbose)
    if result.get("status") == "ok":
        with open(os.path.join(spec["work_dir"], "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def check_same_settings(models: Dict[str, Dict]) -> bool:
    """All models must share backbone, RPN, input, data, solver and seed (the worker digests those keys)."""
    digests = {name: r["shared_settings_digest"] for name, r in models.items() if r.get("shared_settings_digest")}
    if len(set(digests.values())) > 1:
        print(f"[bench] WARNING: the models differ in shared settings (backbone/RPN/input/data/solver/seed): "
              f"{digests}; compare runs/<model>/config.yaml", flush=True)
        return False
    return True


def time_only(args, argv) -> int:
    """``--time-only``: one invocation that re-times every model's saved final weights back to back."""
    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    models, specs = {}, {}
    for i, name in enumerate(args.models):
        work_dir = os.path.join(args.out, "runs", name)
        try:
            with open(os.path.join(work_dir, "spec.json")) as f:
                spec = json.load(f)
        except OSError:
            models[name] = {"name": name, "status": "skipped", "message": f"no {work_dir}/spec.json: not trained"}
            print(f"[bench] ({i + 1}/{len(args.models)}) {name}: skipped ({models[name]['message']})", flush=True)
            continue
        spec.update(mode="time", config_file=in_this_checkout(spec["config_file"]), threads=args.threads,
                    timing_iters=args.timing_iters, flop_images=args.flop_images,
                    test_variants={v: list(TEST_VARIANTS[v]) for v in args.variants},  # timed, whatever was trained
                    result_file=os.path.join(work_dir, "timing_result.json"),
                    opts=[*spec["opts"], *map(str, args.opts)])  # KEY VALUE pairs given now apply on top
        print(f"[bench] ({i + 1}/{len(args.models)}) {name}: timing", flush=True)
        models[name] = run_worker(spec, args.verbose)
        specs[name] = spec
    timed = [name for name in specs if models[name].get("status") == "ok"]
    for round_index in range(1, args.rounds):
        for name in (timed[::-1] if round_index % 2 else list(timed)):  # A B, B A, A B, ...
            print(f"[bench] round {round_index + 1}/{args.rounds}: {name}: timing inference", flush=True)
            again = run_worker(dict(specs[name], mode="time_inference", result_file=os.path.join(
                specs[name]["work_dir"], "timing_round_result.json")), args.verbose)
            if again.get("status") != "ok":
                models[name].update(status="failed", message=f"round {round_index + 1}: {again.get('message')}")
                timed.remove(name)
                continue
            models[name]["inference"].setdefault("round_medians", [
                models[name]["inference"]["s_per_image"]["median"]]).append(again["inference"]["s_per_image"]["median"])
    for name in timed:
        inference = models[name]["inference"]
        if "round_medians" in inference:  # the first round's per-image summary is kept beside the rounds'
            inference["first_round_s_per_image"] = inference["s_per_image"]
            medians = inference["round_medians"]
            inference["s_per_image"] = {"median": round(statistics.median(medians), 5), "min": min(medians),
                                        "max": max(medians)}
    meta = {"dataset": args.dataset, "out": args.out, "models": args.models, "threads": args.threads,
            "rounds": args.rounds,
            "timing_iters": args.timing_iters, "flop_images": args.flop_images, "git": git_description(),
            "command": " ".join(["python -m benchmarks.run_benchmark", *(argv if argv is not None else sys.argv[1:])]),
            "started": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - t0, 1),
            "host": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}}
    paths = report.write_timing(args.out, meta, models)
    print(open(paths["markdown"]).read(), flush=True)
    failed = [name for name, r in models.items() if r.get("status") == "failed"]
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.time_only:
        return time_only(args, argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device available", file=sys.stderr)
            return 2
    if not args.seeds:
        return run_models(args, argv)[2]
    metas, per_seed, status = {}, {}, 0
    for seed in args.seeds:
        one = copy.copy(args)
        one.seed, one.out = seed, os.path.join(args.out, f"seed{seed}")
        command = [a for a in (argv if argv is not None else sys.argv[1:])]
        metas[seed], per_seed[seed], failed = run_models(one, _one_seed_command(command, seed, one.out, len(args.opts)))
        status = max(status, failed)
    paths = seeds.write_outputs(args.out, metas, per_seed)
    print(open(paths["markdown"]).read(), flush=True)
    print("[bench] wrote " + ", ".join(paths.values()), flush=True)
    return status


def _one_seed_command(argv: List[str], seed: int, out: str, num_opts: int = 0) -> List[str]:
    """The command line of one seed's run: --seeds -> --seed N, --out -> its seed<N> folder, placed before the
    trailing ``num_opts`` KEY VALUE config options (flags after them are refused)."""
    flags, opts = argv[:len(argv) - num_opts], argv[len(argv) - num_opts:]
    command, skip = [], False
    for a in flags:
        if skip:
            skip = False
            continue
        if a in ("--seeds", "--out", "--seed"):
            skip = True
            continue
        if not a.startswith(("--seeds=", "--out=", "--seed=")):
            command.append(a)
    return command + ["--seed", str(seed), "--out", out] + opts


def run_models(args, argv) -> Tuple[Dict, Dict[str, Dict], int]:
    """Train, evaluate and time every --models model on one seed; write <out>/benchmark.* after each model
    (a run stopped from outside keeps what it measured). With --budget-s, the models not started when the
    budget is used up are skipped. Returns (meta, results, exit status: 1 if a model failed)."""
    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    print(f"[bench] {args.dataset}, size {args.size}: {', '.join(args.models)}; {args.iters} iterations each, "
          f"eval every {args.eval_period}; {args.device}, {args.threads} threads -> {args.out}", flush=True)
    models = {}
    for i, name in enumerate(args.models):
        work_dir = os.path.join(args.out, "runs", name)
        t_model = time.perf_counter()
        if args.budget_s and t_model - t0 > args.budget_s:
            models[name] = {"name": name, "label": MODELS[name].label, "status": "skipped",
                            "message": f"the time budget (--budget-s {args.budget_s:g}) was used up"}
            print(f"[bench] ({i + 1}/{len(args.models)}) {name}: skipped ({models[name]['message']})", flush=True)
            continue
        print(f"[bench] ({i + 1}/{len(args.models)}) {name}: starting (log: {work_dir}/worker.log)", flush=True)
        spec = model_spec(name, args, work_dir)
        reused = reusable_result(spec, args.keep_diverged) if args.resume else None
        if reused and reused.get("reevaluate"):
            print(f"[bench] ({i + 1}/{len(args.models)}) {name}: re-evaluating its final weights (--resume; only "
                  f"test-time settings changed: {', '.join(reused['reevaluate'])})", flush=True)
            models[name] = reevaluate(spec, reused, args.verbose)
            continue
        if reused:
            models[name] = reused
            print(f"[bench] ({i + 1}/{len(args.models)}) {name}: reusing its result (--resume, same spec; "
                  f"git {reused.get('git', 'not recorded')})", flush=True)
            continue
        models[name] = run_worker(spec, args.verbose)
        models[name]["git"] = git_description()
        if models[name].get("status") == "ok":  # the result file, as --resume will read it
            with open(spec["result_file"], "w") as f:
                json.dump(models[name], f, indent=1)
        elapsed = time.perf_counter() - t_model
        left = len(args.models) - i - 1
        eta = f"; about {elapsed * left / 60:.0f} min left" if left else ""
        print(f"[bench] ({i + 1}/{len(args.models)}) {name}: {models[name]['status']} in {elapsed / 60:.1f} min{eta}",
              flush=True)
        if left:
            report.write_outputs(args.out, _meta(args, argv, models, started, t0), models)

    meta = _meta(args, argv, models, started, t0)
    paths = report.write_outputs(args.out, meta, models)
    print(f"[bench] done in {meta['wall_s'] / 60:.1f} min", flush=True)
    print(open(paths["markdown"]).read(), flush=True)
    print("[bench] wrote " + ", ".join(paths.values()), flush=True)
    failed = [name for name, r in models.items() if r.get("status") == "failed"]
    if failed:
        print(f"[bench] WARNING: {', '.join(failed)} failed (see the table and runs/<model>/worker.log)", flush=True)
    return meta, models, 1 if failed else 0


def _meta(args, argv, models: Dict[str, Dict], started, t0: float) -> Dict:
    """benchmark.json's "benchmark" entry: the invocation, the shared settings (from the first model that
    ran ok) and the host."""
    settings = next((r for r in models.values() if r.get("status") == "ok"), {}).get("settings", {})
    return {
        "dataset": args.dataset, "size": args.size, "models": args.models, "device": args.device,
        "threads": args.threads, "seed": args.seed, "iters": args.iters, "variants": args.variants,
        "eval_period": args.eval_period, "ims_per_batch": settings.get("ims_per_batch"),
        "backbone": settings.get("backbone", "?"), "train_dataset": settings.get("train_dataset"),
        "val_dataset": settings.get("val_dataset"), "num_val_images": settings.get("num_val_images"),
        "extra_opts": args.opts, "same_shared_settings": check_same_settings(models),
        "command": " ".join(["python -m benchmarks.run_benchmark", *(argv if argv is not None else sys.argv[1:])]),
        "started": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - t0, 1),
        "git": git_description(),
        "host": {"platform": platform.platform(), "python": platform.python_version(),
                 "cpu_count": os.cpu_count(), "device_name": settings.get("device_name", args.device),
                 "torch": settings.get("torch"), "detectron2": settings.get("detectron2")},
    }


if __name__ == "__main__":
    sys.exit(main())
