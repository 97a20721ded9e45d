"""How a job runs `halos`: one process, torchrun on one node, or srun + torchrun over nodes.

How a job runs on Slurm (rules/*.smk -> snakemake-executor-plugin-slurm):

  sbatch --nodes N --cpus-per-task C [--gres gpu:G] ...   one allocation per job
    srun -n1 ... snakemake (the plugin's job step) ->  the rule's shell, on the first node:
      1 process:     env OMP_NUM_THREADS=C halos ...
      P per node:    env OMP_NUM_THREADS=C/P torchrun --standalone --nproc_per_node P -m halos ...
      N nodes:       env -u SLURM_JOB_NODELIST OMP_NUM_THREADS=C/P srun --overlap --nodes N
                       --ntasks N --ntasks-per-node 1 bash -c 'endpoint=FIRST_HOST:PORT;
                       echo "[halos] node I of N: HOST (ADDRESS), rendezvous at $endpoint";
                       exec torchrun --nnodes N --nproc_per_node P --rdzv_backend c10d
                       --rdzv_id $SLURM_JOB_ID --rdzv_endpoint "$endpoint" "$@"' halos-node
                       -m halos ...

The nodes are those of the job's allocation (the rule's `nodes` resource): training jobs get
the row's `nodes`, ref-logps one node (`resources("infer")`), so it runs P processes there.
Each node's torchrun first logs its host name and address to the job's log.

torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for every process; the ranks
across nodes come from the c10d rendezvous on the first host of the allocation
(`scontrol show hostnames $SLURM_JOB_NODELIST | head -n1`), whose port `rendezvous_port` derives
from $SLURM_JOB_ID so that two jobs sharing a node do not collide (`srun -n N python -m halos`
uses the same port, halos/train/distributed.py). `--standalone` (one node) picks a free port by
itself. Only commands that join a process group (sft, align, ref-logps, ppo) go multi-process;
sampling and evals run one process with all the job's CPUs.
"""

from __future__ import annotations

import os
import shlex

from halos.suite.resources import processes
from halos.suite.tables import Suite

RDZV_PORT_BASE, RDZV_PORT_SPAN = 29500, 10000


def rendezvous_port(job_id: int) -> int:
    """The rendezvous port of Slurm job `job_id` (the shell form is in `launch_command`)."""
    return RDZV_PORT_BASE + job_id % RDZV_PORT_SPAN


def add_to_path(directory: str) -> None:
    """Append `directory` to this process's PATH (inherited by its jobs) unless it is there."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if directory not in entries:
        os.environ["PATH"] = os.pathsep.join([*filter(None, entries), directory])


def launch_command(nodes: int, procs: int, threads: int, multinode: bool | None = None) -> str:
    """The shell prefix that runs `halos` as `procs` processes on each of `nodes` nodes.
    `multinode` (default: nodes > 1) picks the srun + c10d path; tests force it on one node."""
    multinode = nodes > 1 if multinode is None else multinode
    if not multinode and nodes == 1 and procs == 1:
        return f"env OMP_NUM_THREADS={threads} halos"
    per_proc = max(1, threads // procs)
    if not multinode:
        return (f"env OMP_NUM_THREADS={per_proc} torchrun --standalone --nproc_per_node {procs} "
                f"-m halos")
    # Nested in the job step that runs this shell (the plugin's `srun -n1`): --overlap shares
    # that step's resources; one torchrun per node spawns the processes of its node. That step
    # set SLURM_JOB_NODELIST to its own one node: unset, srun looks the whole allocation up
    # (else "Only allocated 1 nodes asked for 2"), and each task sees all the job's nodes.
    port = f"$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN}))"
    per_node = ('endpoint=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):' + port
                + '; echo "[halos] node $SLURM_NODEID of $SLURM_NNODES: $(hostname) '
                '($(hostname -I)), rendezvous at $endpoint" >&2; '
                f'exec torchrun --nnodes {nodes} --nproc_per_node {procs} --rdzv_backend c10d '
                '--rdzv_id $SLURM_JOB_ID --rdzv_endpoint "$endpoint" "$@"')
    return (f"env -u SLURM_JOB_NODELIST OMP_NUM_THREADS={per_proc} srun --overlap "
            f"--nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 "
            f"bash -c {shlex.quote(per_node)} halos-node -m halos")


def launcher(suite: Suite, model: str, threads: int, distributed: bool = True,
             nodes: int | None = None) -> str:
    """The one place that decides how a model's job runs `halos` (see the module docstring).
    `distributed=False` (sampling, evals: no process group) always runs one process. `nodes`:
    the job's allocation (default: the row's `nodes`, as a training job gets)."""
    if not distributed:
        return launch_command(1, 1, threads)
    nodes = suite.models[model]["nodes"] if nodes is None else nodes
    return launch_command(nodes, processes(suite, model), threads)
