"""Each job's resources (Slurm and local): memory, wall time, nodes, GPUs, CPUs, from its model's
row of the models table. Rules declare `resources: **resources("train")` (rules/common.smk).
A row without `runtime` / `mem_mb` gets them from the plan (halos/plan/slurm.py)."""

from __future__ import annotations

from typing import Any

from halos.suite.tables import Suite

# Jobs with no model (data, judge, report): small and single-threaded.
CPU_JOB = {"mem_mb": 4000, "runtime": 60, "nodes": 1, "gres": "", "cpus_per_task": 1, "tasks": 1,
           "slurm_extra": ""}
RESOURCE_KEYS = tuple(CPU_JOB)


def processes(suite: Suite, model: str) -> int:
    """Training processes per node: the `processes` column, else one per GPU (at least 1)."""
    row = suite.models[model]
    return row.get("processes") or max(1, row["gpus"])


def world_size(suite: Suite, model: str) -> int:
    return processes(suite, model) * suite.models[model]["nodes"]


def threads(suite: Suite, model: str) -> int:
    """CPU cores per job and node: the `cpus` column, at least one per process."""
    return max(suite.models[model]["cpus"], processes(suite, model))


def resources(suite: Suite | None, model: str | None, stage: str) -> dict[str, Any]:
    """Resources of a job: `train` (all nodes), `infer` (ref-logps, sampling, evals: one node),
    `cpu` (judge, data, report). One task (launcher) per node: `tasks` becomes sbatch --ntasks
    for CPU jobs; GPU jobs leave it unset (the plugin would read it as --ntasks-per-gpu) and get
    --ntasks-per-node=1 instead."""
    if stage == "cpu":
        return dict(CPU_JOB)
    row = suite.models[model]
    train = stage == "train"
    nodes = row["nodes"] if train else 1
    extra = [row["slurm_extra"]]
    if nodes > 1 and row["gpus"]:
        extra.append("--ntasks-per-node=1")
    gpu = f"gpu:{row['gpu_model']}:{row['gpus']}" if row.get("gpu_model") else f"gpu:{row['gpus']}"
    planned = _from_plan(suite, model, row)
    return {"mem_mb": planned["mem_mb"],
            "runtime": planned["runtime"] if train else row["eval_runtime"],
            "nodes": nodes, "gres": gpu if row["gpus"] else "",
            "cpus_per_task": threads(suite, model), "tasks": None if row["gpus"] else nodes,
            "slurm_extra": " ".join(e for e in extra if e)}


def _from_plan(suite: Suite, model: str, row: dict) -> dict[str, int]:
    """The row's runtime and mem_mb, or the plan's (halos/plan/slurm.py: planned hours and
    DeepSpeed's CPU estimate times a stated safety factor) for a column left unset."""
    values = {"runtime": row.get("runtime"), "mem_mb": row.get("mem_mb")}
    if None in values.values():
        from halos.plan.slurm import planned_resources  # imports DeepSpeed's estimators

        planned = planned_resources(suite, model)
        values = {k: planned[k] if v is None else v for k, v in values.items()}
    return values
