"""Process launching: detectron2's own ``launch`` on GPUs, a gloo launcher on CPUs.

detectron2 v0.6's ``detectron2.engine.launch`` asserts CUDA and uses NCCL, so it cannot start
several CPU processes. :func:`launch_cpu` does the same job with the gloo backend and, as
``launch`` does, creates detectron2's per-machine process group
(``detectron2.utils.comm._LOCAL_PROCESS_GROUP``), which ``create_ddp_model`` and
``comm.get_local_rank`` rely on. :func:`launch` picks one of the two, so
``train_net.py --num-gpus 8`` always takes detectron2's path.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["launch", "launch_cpu"]

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_local_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    procs_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Sequence,
    threads_per_proc: int,
    timeout: timedelta,
) -> None:
    from detectron2.utils import comm

    global_rank = machine_rank * procs_per_machine + local_rank
    torch.set_num_threads(threads_per_proc)
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
        timeout=timeout,
    )
    num_machines = world_size // procs_per_machine
    for i in range(num_machines):
        ranks = list(range(i * procs_per_machine, (i + 1) * procs_per_machine))
        group = dist.new_group(ranks)  # every rank must take part in creating every group
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
        # every rank finishes its collectives before any rank tears gloo down: a rank that
        # destroys the group while a peer still talks to it can abort the peer at exit
        # ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch_cpu(
    main_func: Callable,
    num_processes: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: Sequence = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in ``num_processes`` CPU processes per machine (gloo).

    Args:
        main_func: the function every process runs (must be picklable: a module-level one).
        num_processes: processes on this machine; 1 runs ``main_func`` in this process.
        num_machines, machine_rank, dist_url: as in ``detectron2.engine.launch``;
            ``dist_url="auto"`` picks a free local port (single machine only).
        args: arguments for ``main_func``.
        timeout: gloo collective timeout.
    """
    world_size = num_machines * num_processes
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' works only on one machine; pass tcp://HOST:PORT")
        dist_url = _free_local_url()
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    mp.start_processes(
        _cpu_worker,
        nprocs=num_processes,
        args=(main_func, world_size, num_processes, machine_rank, dist_url, tuple(args),
              threads, timeout),
        daemon=False,
        start_method="spawn",
    )


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: Sequence = (),
    num_cpu_processes: int = 0,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """detectron2's ``launch`` when GPUs are asked for, otherwise :func:`launch_cpu`.

    Args:
        num_gpus_per_machine: GPUs per machine (``--num-gpus``); > 0 uses detectron2's launch.
        num_cpu_processes: CPU processes per machine when no GPU is requested (0 or 1: run
            in this process).
        other args: as in ``detectron2.engine.launch``.
    """
    if num_gpus_per_machine > 0 and num_cpu_processes > 0:
        raise ValueError("ask for GPUs (--num-gpus) or CPU processes (--num-cpu-procs), not both")
    if num_gpus_per_machine > 0:
        if num_gpus_per_machine * num_machines == 1:
            main_func(*args)  # what detectron2's launch does for one process
            return
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"--num-gpus {num_gpus_per_machine} was given but CUDA is not available; "
                "use --num-gpus 0 (and MODEL.DEVICE cpu), optionally with --num-cpu-procs N"
            )
        from detectron2.engine import launch as d2_launch

        d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                  machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
        return
    launch_cpu(main_func, max(1, num_cpu_processes), num_machines=num_machines,
               machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
