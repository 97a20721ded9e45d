"""The process group every command joins: torchrun, the deepspeed launcher, `srun -n N`, or
one process on its own."""

from __future__ import annotations

import os
import socket
import subprocess

import torch
import torch.distributed as dist

from halos.suite.launch import rendezvous_port


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun / the deepspeed launcher / `srun` set up, or make one of 1."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(_slurm_ranks() or dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port())))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


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
