"""Slurm resources of a models-table row that leaves `runtime` or `mem_mb` unset, from the plan
(tokens estimated from the tables, so Snakemake plans without tokenizing anything):

    runtime  = the longest of the row's training jobs in the suite, planned hours × 60 ×
               SAFETY_FACTOR + STARTUP_MINUTES (loading weights, DeepSpeed init, final save)
    mem_mb   = (DeepSpeed's CPU estimate per node for the model states + HOST_MEMORY_PER_PROCESS
               × processes per node) × SAFETY_FACTOR, the largest of the row's training jobs

The plan assumes `MFU` of peak; a slower cluster (or a worse MFU) needs a bigger factor:
override per rule with `--set-resources align:runtime=...` or set the column.
"""

from __future__ import annotations

import math

from halos.plan.hardware import GiB

SAFETY_FACTOR = 1.5
STARTUP_MINUTES = 20
HOST_MEMORY_PER_PROCESS = 8 * GiB  # torch + CUDA + NCCL + tokenized data of one process


def _training_rows(suite, model: str) -> list:
    from halos.plan.jobs import Options, Planner, training_jobs

    planner = Planner(suite, Options(count=False))
    return [planner.train_row(rule, run) for rule, run in training_jobs(suite)
            if run.model == model]


def _planned(suite, model: str) -> tuple[int, int]:
    import halos.suite as hs

    rows = _training_rows(suite, model)
    if not rows:
        raise ValueError(f"models table row {model!r}: no training job in suite {suite.name!r} "
                         f"to plan runtime/mem_mb from; set them in the row")
    hours = max(r.hours for r in rows)
    runtime = math.ceil(hours * 60 * SAFETY_FACTOR + STARTUP_MINUTES)
    processes = hs.processes(suite, model)
    host = max(r.memory.cpu_per_node + processes * HOST_MEMORY_PER_PROCESS for r in rows)
    return runtime, math.ceil(host * SAFETY_FACTOR / 2**20)


_CACHE: dict[tuple, tuple[int, int]] = {}  # Snakemake asks once per job and resource


def planned_resources(suite, model: str) -> dict[str, int]:
    """{"runtime": minutes, "mem_mb": MB} the plan gives a row (cached per suite and row)."""
    key = (str(suite.path), suite.name, repr(suite.models[model]), repr(suite.runs))
    if key not in _CACHE:
        _CACHE[key] = _planned(suite, model)
    runtime, mem_mb = _CACHE[key]
    return {"runtime": runtime, "mem_mb": mem_mb}
