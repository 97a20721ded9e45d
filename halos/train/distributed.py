"""The process group every command joins: torchrun, the deepspeed launcher, `srun -n N`, or
one process on its own."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from halos.suite.launch import rendezvous_port

SHM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.comm.ShareMemCommBuilder.NAME


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun / the deepspeed launcher / `srun` set up, or make one of 1."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(_slurm_ranks() or dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port())))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        with _shm_op_only_across_processes(int(os.environ["WORLD_SIZE"])):
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def _shm_op_only_across_processes(world_size: int) -> Iterator[None]:
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op (`deepspeed_shm_comm`,
    35-60 s of C++ on a fresh machine) whenever it starts, even for one process, which never
    communicates. Skip the build for one process; for several, build it once per environment:
    its build command names the venv's include paths, so two venvs sharing the default
    ~/.cache/torch_extensions rebuild each other's op on every alternation."""
    import deepspeed.ops

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_extensions_dir()))
    compatible = deepspeed.ops.__compatible_ops__
    was = compatible.get(SHM_OP)
    if world_size == 1 and SHM_OP in compatible:
        compatible[SHM_OP] = False
    try:
        yield
    finally:
        if was is not None:
            compatible[SHM_OP] = was


def _extensions_dir() -> Path:
    """torch's JIT extension folder for this interpreter's environment."""
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "torch_extensions" / f"halos-{tag}"


def _slurm_ranks() -> dict[str, str] | None:
    """Ranks of a job step started by `srun -n N python -m halos …` (one task per process).

    The rendezvous is the first host of the allocation, on the port the DAG's multi-node
    launcher uses (`halos.suite.launch.rendezvous_port`), derived from the job id so that
    concurrent jobs sharing a node do not collide.
    """
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) < 2:
        return None
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    return dict(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                WORLD_SIZE=os.environ.get("SLURM_STEP_NUM_TASKS", os.environ["SLURM_NTASKS"]),
                MASTER_ADDR=nodes[0],
                MASTER_PORT=str(rendezvous_port(int(os.environ.get("SLURM_JOB_ID", "0")))))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def close_distributed() -> None:
    """Leave the process group at the end of a command that succeeded. Without it gloo's worker
    threads are still alive at interpreter shutdown and can abort the process (SIGABRT,
    "terminate called without an active exception", pytorch/pytorch#190489) after all its
    work is written, failing the job. Call it only on success: after an error on one rank the
    others may sit in a collective that this barrier would never match (pytorch/torchtitan#1342)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
