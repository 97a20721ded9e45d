"""DeepSpeed setup shared by every command: process group, config, model, engine, checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from halos.config import ConfigError, TrainConfig, resolve_deepspeed_config
from halos.io import atomic_dir, atomic_file

LATEST = "latest"


# ----------------------------------------------------------------------------- processes
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

    The rendezvous is the first host of the allocation, on a port derived from the job id so
    that concurrent jobs sharing a node do not collide.
    """
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) < 2:
        return None
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    return dict(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                WORLD_SIZE=os.environ.get("SLURM_STEP_NUM_TASKS", os.environ["SLURM_NTASKS"]),
                MASTER_ADDR=nodes[0],
                MASTER_PORT=str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- config
def use_bf16(precision: str) -> bool:
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """Load the chosen DeepSpeed JSON and fill its "auto" fields from the run config.

    A value the JSON sets explicitly that contradicts the run config is an error, never silently
    rewritten.
    """
    path = resolve_deepspeed_config(cfg.deepspeed)
    ds = json.loads(path.read_text())
    wanted = {
        ("train_micro_batch_size_per_gpu",): cfg.micro_batch_size,
        ("gradient_accumulation_steps",): cfg.gradient_accumulation_steps,
        ("gradient_clipping",): cfg.max_grad_norm,
        ("bf16", "enabled"): use_bf16(cfg.precision),
    }
    for keys, value in wanted.items():
        parent = ds
        for key in keys[:-1]:
            parent = parent.setdefault(key, {})
        current = parent.get(keys[-1], "auto")
        if current == "auto":
            parent[keys[-1]] = value
        elif current != value:
            raise ConfigError(f"{path}: {'.'.join(keys)} = {current!r} contradicts the run config "
                              f"({value!r}); set it to \"auto\" or change the run option")
    ds.pop("train_batch_size", None)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# ----------------------------------------------------------------------------- model
def load_causal_lm(path: str, ds: dict[str, Any], extra_tokens: tuple[str, ...] = ()):
    """Load a causal LM (and its tokenizer) by hub id or folder; under ZeRO-3 it loads sharded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)},
                                         replace_extra_special_tokens=False) if extra_tokens else 0
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    keep_alive = None
    if zero_stage(ds) == 3:
        # Tells from_pretrained to build the model under deepspeed.zero.Init, partitioned.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    del keep_alive
    return model, tokenizer


def build_engine(module: torch.nn.Module, ds: dict[str, Any], cfg: TrainConfig | None,
                 total_steps: int = 0):
    """deepspeed.initialize with AdamW and a warmup + decay schedule (or no optimizer: inference)."""
    import deepspeed

    if cfg is None:
        engine, *_ = deepspeed.initialize(model=module, config=ds)
        engine.eval()
        return engine
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    # The fused kernel is several times faster than the per-tensor loop, on CPU as on GPU.
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), fused=_fused_adam_ok(module))
    schedule = lr_lambda(cfg, total_steps)
    # A callable: DeepSpeed builds the scheduler on the optimizer it wraps (ZeRO-3 regroups params).
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds,
        lr_scheduler=lambda wrapped: torch.optim.lr_scheduler.LambdaLR(wrapped, schedule))
    return engine


def _fused_adam_ok(module: torch.nn.Module) -> bool:
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = cfg.warmup_steps * total_steps if cfg.warmup_steps < 1 else cfg.warmup_steps
    warmup = max(1, int(round(warmup)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(engine, root: Path, step: int, client_state: dict[str, Any]) -> None:
    """Write checkpoint `step_N` so that a crash mid-write never looks complete.

    DeepSpeed writes into `step_N.partial/`; once every rank is done, rank 0 renames it and only
    then points `latest` at it (atomic rename). Older checkpoints are removed afterwards.
    """
    tag = f"step_{step}"
    partial = root / f"{tag}.partial"
    if is_main() and partial.exists():
        shutil.rmtree(partial)
    barrier()
    engine.save_checkpoint(str(root), tag=partial.name, client_state=client_state,
                           save_latest=False)
    barrier()
    if is_main():
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        with atomic_file(root / LATEST) as handle:
            handle.write(tag)
        for old in root.glob("step_*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def latest_checkpoint(root: Path) -> str | None:
    marker = root / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (root / tag).is_dir() else None


def load_checkpoint(engine, root: Path, tag: str) -> dict[str, Any]:
    _, client_state = engine.load_checkpoint(str(root), tag=tag)
    if client_state is None:
        raise RuntimeError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    return client_state


def resume_latest(engine, root: Path, fingerprint: str) -> dict[str, Any] | None:
    """Load the latest complete checkpoint under `root` and return its client state plus its
    "path" (None if there is none); refuse one saved by a run with other options, whose batches
    and schedule would not line up."""
    tag = latest_checkpoint(root)
    if tag is None:
        return None
    state = load_checkpoint(engine, root, tag)
    if state.get("fingerprint") != fingerprint:
        raise RuntimeError(
            f"{root / tag} belongs to a run with other options (or world size); "
            f"delete {root} to start over, or rerun with the original options")
    return {**state, "path": str(root / tag)}


def consolidated_state_dict(engine, ds: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere); gathers ZeRO-3 shards layer by layer."""
    if zero_stage(ds) == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if is_main() else None


def export_hf_folder(module: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None,
                     tokenizer, out: Path, extra_files: dict[str, dict] | None = None) -> None:
    """Rank 0 writes a `save_pretrained` folder (safetensors, tokenizer, generation config).

    `module` is the trained wrapper (log-prob or value-head model); it knows how to save itself.
    """
    if not is_main():
        return
    with atomic_dir(out) as tmp:
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
