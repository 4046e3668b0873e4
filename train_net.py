#!/usr/bin/env python
"""Train / evaluate MNC with Detectron2.

    python train_net.py --config-file configs/mnc_R18_GN_FPN_shapes_cpu.yaml
    python train_net.py --config-file configs/mnc_R18_GN_FPN_shapes_cpu.yaml --resume          # after a crash
    python train_net.py --config-file configs/mnc_R18_GN_FPN_shapes_cpu.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python train_net.py --config-file ... --dataset mine_train=train.json:train_images \
        --dataset mine_val=val.json:val_images DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)' \
        MODEL.ROI_HEADS.NUM_CLASSES <categories>                                            # your COCO data
    python train_net.py --config-file configs/lazy/mnc_R18_GN_FPN_shapes_cpu.py train.max_iter=100   # LazyConfig

A training run locks its OUTPUT_DIR (a second run there stops with an ERROR naming the holder); an
--eval-only run writes under OUTPUT_DIR/eval/<time>-<pid>/ and needs no lock.

Several processes (data parallel; SOLVER.IMS_PER_BATCH is the total over processes):

    python train_net.py --num-processes 2 --config-file ...      # CPU processes, Gloo (MODEL.DEVICE cpu)
    python train_net.py --num-gpus 8 --config-file ...           # one process per GPU, NCCL
    torchrun --nproc_per_node 2 train_net.py --config-file ...   # processes started by torchrun
    # several machines: add --num-machines M --machine-rank R --dist-url tcp://<machine 0>:<port>

Errors caused by the input (a config key, a dataset file, an image, missing weights, a NaN loss)
end the run with one message and exit status 2; set MNC_D2_TRACEBACK=1 to see the traceback.
"""
import errno
import os
import sys
import traceback

import torch.multiprocessing as mp

from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import mnc_d2  # noqa: F401  (registers MNC's model parts and datasets)
from mnc_d2.data.datasets.command_line import add_dataset_argument, register_datasets
from mnc_d2.engine import load_weights_for_eval, setup_cfg, trainer_class
from mnc_d2.utils.errors import ConfigError, MNCError
from mnc_d2.engine.launch import launch, lost_peer, started_by_torchrun

EXIT_INPUT_ERROR = 2


def main(args):
    register_datasets(args.dataset)  # --dataset NAME=...: before the config names it (in every process)
    cfg = setup_cfg(args)
    trainer = trainer_class(args)  # Trainer, or for a .py config (LazyConfig) a LazyTrainer
    try:  # a run refused before training leaves its output directory as it was
        if args.eval_only:
            if not cfg.DATASETS.TEST:
                raise ConfigError("--eval-only: DATASETS.TEST is empty, there is nothing to evaluate.")
            model = trainer.build_model(cfg)
            load_weights_for_eval(cfg, model, resume=args.resume, checkpoint_dir=args.run_dir)
        else:
            trainer = trainer(cfg)
            trainer.resume_or_load(resume=args.resume)
    except MNCError:
        if args.output_snapshot is not None:
            args.output_snapshot.restore()
        raise
    if args.eval_only:
        res = trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    return trainer.train()


def main_reporting_errors(args):
    """``main``; an MNCError, or another process of the job going away, ends this process with one ERROR line (no
    traceback) and exit status 2."""
    try:
        return main(args)
    except MNCError as e:
        if os.environ.get("MNC_D2_TRACEBACK") == "1":
            traceback.print_exc()
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the worker's message
            message = message.rstrip().splitlines()[-1]
        rank = f" (process {comm.get_rank()})" if comm.get_world_size() > 1 else ""
        print(f"ERROR{rank}: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT_ERROR)
    except OSError as e:  # a full or read-only disk while writing logs, configs or evaluation results
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        rank = f" (process {comm.get_rank()})" if comm.get_world_size() > 1 else ""
        print(f"ERROR{rank}: cannot write {e.filename or 'into the output directory'}: {e.strerror}. Files written "
              "before are intact; free space (or choose another OUTPUT_DIR) and run again.", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT_ERROR)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        print(f"ERROR (process {comm.get_rank()}): lost another process of the job: {str(e).splitlines()[0][:300]} "
              "Its own log says why. Checkpoints written so far are intact: restart every machine's command with "
              "--resume.", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT_ERROR)


def argument_parser():
    parser = default_argument_parser()
    add_dataset_argument(parser)
    parser.add_argument("--num-processes", type=int, default=0, metavar="N",
                        help="N CPU processes per machine, Gloo backend (instead of --num-gpus)")
    parser.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="auto: Gloo for --num-processes, NCCL for --num-gpus, under torchrun NCCL if CUDA "
                             "is available else Gloo")
    return parser


def launch_from_args(args):
    """Start ``main`` in the processes the command line asks for."""
    if args.num_processes and args.num_gpus > 1:
        raise ConfigError("Pass either --num-processes (CPU) or --num-gpus (GPU), not both.")
    if started_by_torchrun():
        processes, backend = 1, args.dist_backend
    elif args.num_processes:
        processes, backend = args.num_processes, "gloo" if args.dist_backend == "auto" else args.dist_backend
    else:
        processes, backend = args.num_gpus, "nccl" if args.dist_backend == "auto" else args.dist_backend
        if processes * args.num_machines > 1 and backend == "nccl":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"--num-gpus {processes}: CUDA is not available. Use --num-processes "
                                  f"{processes} for CPU processes (Gloo).")
    return launch(main_reporting_errors, processes, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,), backend=backend)


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch_from_args(args)
    except ConfigError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)
    except mp.ProcessExitedException as e:  # a spawned process failed (and printed why, unless it was killed)
        if e.exit_code is not None and e.exit_code < 0:
            print(f"ERROR: process {e.error_index} of the job was killed by signal {-e.exit_code} (out of memory?); "
                  "the others were stopped. Checkpoints written so far are intact: rerun with --resume.",
                  file=sys.stderr)
            sys.exit(EXIT_INPUT_ERROR)
        sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
