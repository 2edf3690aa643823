"""Launch helpers: run a function on N local gloo processes (tests, benchmarks), or set up the
process group and mesh under torchrun (`openk2 train --pp 2 --ep 2` launched by torchrun)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from openk2.distributed.mesh import Mesh, ParallelConfig, init_from_env, shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    finished = False
    try:
        fn(rank, world, *args)
        finished = True
    finally:
        shutdown(finished)


def spawn(fn: Callable, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) on `world_size` CPU processes joined by gloo. `fn` must be a
    module-level function; an exception in any rank is raised here."""
    mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, start_method="spawn"
    )


def setup(parallel: ParallelConfig) -> Mesh:
    """Under torchrun: init the process group from the environment and build the mesh. Without it
    (one process) the mesh must be trivial."""
    if not init_from_env() and parallel.world_size != 1:
        raise RuntimeError(
            f"--pp {parallel.pp} --dp {parallel.dp} --ep {parallel.ep} needs {parallel.world_size} "
            f"processes: launch with `torchrun --nproc-per-node {parallel.world_size} -m openk2.cli train`"
        )
    return Mesh.build(parallel)
