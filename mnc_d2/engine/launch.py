"""Multi-process training on CPU (Gloo) or GPU (NCCL), spawned here or by ``torchrun``.

D2 0.6's ``detectron2.engine.launch`` only spawns CUDA processes with NCCL. :func:`launch` adds:

* ``backend="gloo"``: N CPU processes per machine, spawned with ``torch.multiprocessing`` and set up
  like D2's ``_distributed_worker`` (process group, D2's per-machine ``comm._LOCAL_PROCESS_GROUP``),
  each limited to ``cpu_count // N`` intra-op threads unless ``OMP_NUM_THREADS`` is set;
* ``backend="nccl"``: D2's own launch (one process per GPU);
* a process started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment):
  joins the job through ``env://`` with no spawning; ``backend="auto"`` picks NCCL when CUDA is
  available, else Gloo.

Multi-machine: the same command on every machine with ``num_machines``, ``machine_rank`` and a
``dist_url`` (``tcp://<host of machine 0>:<port>``) reachable from all of them.
"""
import hashlib
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine.launch import _find_free_port
from detectron2.engine.launch import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch", "lost_peer", "started_by_torchrun", "ddp_device_kwargs", "state_dict_digest", "check_replicas_in_sync"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` says another process of a multi-process job went away (killed, crashed, unreachable)."""
    return comm.get_world_size() > 1 and (isinstance(error, dist.DistError) or "by peer" in str(error))  # closed, reset


def started_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    return backend


def _limit_threads(processes_per_machine: int) -> None:
    # N processes with the default (all cores) intra-op threads each oversubscribe the CPU N times.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_per_machine))


def _set_local_process_group(world_size: int, processes_per_machine: int, machine_rank: int) -> None:
    """D2's ``comm._LOCAL_PROCESS_GROUP``: the processes on this machine (every process creates every group)."""
    assert comm._LOCAL_PROCESS_GROUP is None
    for i in range(world_size // processes_per_machine):
        ranks_on_i = list(range(i * processes_per_machine, (i + 1) * processes_per_machine))
        group = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _run_and_clean_up(main_func, args):
    try:
        return main_func(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None


def _join(backend, init_method, world_size, rank, processes_per_machine, local_rank, timeout, main_func, args):
    # Mirrors detectron2.engine.launch._distributed_worker (D2 0.6) without its CUDA-only steps.
    _limit_threads(processes_per_machine)
    try:
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank,
                                timeout=timeout)
    except Exception:
        logger.error(f"Process group URL: {init_method}")
        raise
    _set_local_process_group(world_size, processes_per_machine, rank // processes_per_machine)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    return _run_and_clean_up(main_func, args)


def _distributed_worker(local_rank, main_func, world_size, processes_per_machine, machine_rank, dist_url, args,
                        timeout, backend):
    rank = machine_rank * processes_per_machine + local_rank
    _join(backend, dist_url, world_size, rank, processes_per_machine, local_rank, timeout, main_func, args)


def _join_torchrun_job(main_func, args, backend, timeout):
    world_size = int(os.environ["WORLD_SIZE"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return _join(_resolve_backend(backend), "env://", world_size, int(os.environ["RANK"]), local_size,
                 int(os.environ["LOCAL_RANK"]), timeout, main_func, args)


def launch(main_func, processes_per_machine: int, num_machines: int = 1, machine_rank: int = 0, dist_url=None,
           args=(), timeout=DEFAULT_TIMEOUT, backend: str = "gloo"):
    """Run ``main_func(*args)`` in every process of a (possibly single-process) job.

    Args:
        processes_per_machine: processes to spawn on this machine (GPUs for NCCL). Ignored under torchrun.
        num_machines, machine_rank, dist_url: as D2's launch; ``dist_url="auto"`` picks a free local port
            (single machine only).
        backend: "gloo" (CPU processes), "nccl" (GPU processes, D2's launch) or "auto" (under torchrun:
            NCCL if CUDA is available, else Gloo; otherwise Gloo).

    A spawned process that fails makes the others stop and this call raise
    ``torch.multiprocessing.ProcessRaisedException`` / ``ProcessExitedException``.
    """
    if started_by_torchrun():
        return _join_torchrun_job(main_func, args, backend, timeout)
    backend = "gloo" if backend == "auto" else _resolve_backend(backend)
    world_size = num_machines * processes_per_machine
    if world_size <= 1:
        return main_func(*args)
    if backend == "nccl":
        return d2_launch(main_func, processes_per_machine, num_machines=num_machines, machine_rank=machine_rank,
                         dist_url=dist_url, args=args, timeout=timeout)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine: pass tcp://<host of machine 0>:<port>")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _distributed_worker,
        nprocs=processes_per_machine,
        args=(main_func, world_size, processes_per_machine, machine_rank, dist_url, args, timeout, backend),
        daemon=False,
        start_method="spawn",
    )


def ddp_device_kwargs(model) -> dict:
    """Keyword arguments for D2's ``create_ddp_model``: it passes ``device_ids=[local rank]``, which
    DistributedDataParallel rejects for a CPU model (it must be None there)."""
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cpu":
        return {"device_ids": None}
    return {}


def state_dict_digest(model) -> str:
    """SHA-256 over the names, shapes and bytes of ``model``'s state dict (DDP's ``module.`` prefix ignored)."""
    model = getattr(model, "module", model)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_in_sync(model) -> str:
    """All processes: compare the digests of every process's weights; raise if they differ.

    DDP keeps the replicas equal by construction; a difference means a process skipped a step or a
    buffer was updated locally. Logs this process's digest (each rank's log file) and returns it.
    """
    mine = state_dict_digest(model)
    logger.info(f"Weights digest of process {comm.get_rank()}: {mine}")
    digests = comm.all_gather(mine)
    if len(set(digests)) != 1:
        raise RuntimeError(f"The {len(digests)} processes hold different weights after training: digests {digests}")
    if comm.is_main_process():
        logger.info(f"All {len(digests)} processes hold identical weights (sha256 {mine[:16]}...)")
    return mine
