"""What every training command (sft, align, ppo) does around its loop, written once: refuse to
overwrite a finished model, join the process group, lock the output folder (and clear a killed
run's temporaries), seed, fill the DeepSpeed config, open the metrics sinks, resume from the
latest checkpoint, and clean up at the end."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from halos.config import ConfigError, TrainConfig
from halos.suite.paths import MODEL_DIR
from halos.train.checkpoints import CHECKPOINTS, resume_latest
from halos.train.distributed import barrier, init_distributed
from halos.train.engine import deepspeed_config
from halos.train.metrics import MetricsLogger
from halos.train.outdir import (
    OutputError,
    OutputLock,
    acquire,
    free_mb,
    lock_file,
    raise_on_any_rank,
    remove_stale_temporaries,
)
from halos.train.packing import check_packing


@dataclass(frozen=True)
class Session:
    out: Path  # the run folder (--out)
    final: Path  # out/model, the consolidated Hugging Face folder
    rank: int
    world: int
    ds: dict  # the filled DeepSpeed config
    lock: OutputLock | None = None  # rank 0's lock on `out`

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS


def start_run(cfg: TrainConfig) -> Session:
    """Refuse to overwrite a finished model, join the process group, seed everything and fill
    the DeepSpeed config. Commands validate their options before (no process group on error)."""
    out = Path(cfg.out)
    final = out / MODEL_DIR
    refuse_finished(final, cfg)
    rank, world = init_distributed()
    lock = claim_output(out, rank)
    refuse_finished(final, cfg)  # again under the lock: another run may just have finished
    seed_everything(cfg.seed)
    return Session(out, final, rank, world, deepspeed_config(cfg), lock)


def refuse_finished(final: Path, cfg: TrainConfig) -> None:
    if final.exists() and not cfg.overwrite:
        raise ConfigError(f"{final} already holds a finished model; pass --overwrite to retrain")


def claim_output(out: Path, rank: int, is_file: bool = False) -> OutputLock | None:
    """Rank 0 locks the output (proving it writable) and removes what a killed run left half
    written; if it cannot, every rank raises its one-line error."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = acquire(lock_file(out, is_file), f"--out {out}")
            if is_file:
                remove_stale_temporaries(out.parent, f".{out.name}.*.tmp")
            else:
                remove_stale_temporaries(out, ".*.tmp")
                remove_stale_temporaries(out / CHECKPOINTS, ".*.tmp", "*.partial")
        except OutputError as err:
            error = str(err)
    raise_on_any_rank(error)
    return lock


def check_space(model: torch.nn.Module, out: Path, rank: int) -> None:
    """Refuse to train when the output filesystem cannot even hold the final weights."""
    error = None
    if rank == 0:
        need = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                   for p in model.parameters()) >> 20
        free = free_mb(out)
        if free < need:
            error = (f"--out {out}: {free} MB free, but the final model alone needs about "
                     f"{need} MB (checkpoints more); free space or choose another --out")
    raise_on_any_rank(error)


def open_logger(cfg: TrainConfig, session: Session, total_steps: int) -> MetricsLogger:
    """metrics.jsonl always (rank 0), plus the progress bar, TensorBoard and W&B when asked."""
    return MetricsLogger(session.out, enabled=session.rank == 0, total_steps=total_steps,
                         run_name=cfg.run_name or session.out.name, config=cfg.to_dict(),
                         progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                         wandb_project=cfg.wandb_project, progress_every=cfg.progress_every)


def resume(engine, session: Session, fingerprint: str, logger: MetricsLogger,
           unit: str = "step") -> dict[str, Any]:
    """Load the latest complete checkpoint (if any) and return its client state ("step": the
    step it ends, 0 without one; "final_eval" if it is the run's final checkpoint); the progress
    bar moves on to it and metrics.jsonl keeps exactly the rows up to it (none without one)."""
    state = resume_latest(engine, session.checkpoints, fingerprint)
    step = 0 if state is None else int(state["step"])
    if state is not None:
        logger.message(f"[halos] resumed from {state['path']} at {unit} {step}")
    logger.resume_at(step)
    return state or {"step": 0}


def finish_run(cfg: TrainConfig, session: Session, logger: MetricsLogger) -> None:
    """After the export: wait for every rank, drop the checkpoints (unless kept), close sinks."""
    barrier()
    if session.rank == 0 and not cfg.keep_checkpoints:
        shutil.rmtree(session.checkpoints, ignore_errors=True)
    logger.close()
    if session.lock is not None:
        session.lock.release()


def check_fits(model: torch.nn.Module, cfg: TrainConfig, length: int | None = None,
               what: str | None = None) -> None:
    """The longest sequence a command builds (default --max-length) must fit the model, and
    --packing must be something its attention can express."""
    limit = getattr(model.config, "max_position_embeddings", None)
    length = cfg.max_length if length is None else length
    what = what or f"--max-length {cfg.max_length}"
    if limit is not None and length > limit:
        raise ConfigError(f"{what} exceeds what {cfg.model} supports "
                          f"(max_position_embeddings = {limit}); lower it")
    if cfg.packing:
        check_packing(model.config, cfg.attn_implementation, length)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
