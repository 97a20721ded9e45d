"""What every training command (sft, align, ppo) does around its loop, written once: refuse to
overwrite a finished model, join the process group, seed, fill the DeepSpeed config, open the
metrics sinks, resume from the latest checkpoint, and clean up at the end."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from halos.config import ConfigError, TrainConfig
from halos.suite.paths import MODEL_DIR
from halos.train.checkpoints import CHECKPOINTS, resume_latest
from halos.train.distributed import barrier, init_distributed
from halos.train.engine import deepspeed_config
from halos.train.metrics import MetricsLogger


@dataclass(frozen=True)
class Session:
    out: Path  # the run folder (--out)
    final: Path  # out/model, the consolidated Hugging Face folder
    rank: int
    world: int
    ds: dict  # the filled DeepSpeed config

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS


def start_run(cfg: TrainConfig) -> Session:
    """Refuse to overwrite a finished model, join the process group, seed everything and fill
    the DeepSpeed config. Commands validate their options before (no process group on error)."""
    out = Path(cfg.out)
    final = out / MODEL_DIR
    if final.exists() and not cfg.overwrite:
        raise ConfigError(f"{final} already holds a finished model; pass --overwrite to retrain")
    rank, world = init_distributed()
    seed_everything(cfg.seed)
    return Session(out, final, rank, world, deepspeed_config(cfg))


def open_logger(cfg: TrainConfig, session: Session, total_steps: int) -> MetricsLogger:
    """metrics.jsonl always (rank 0), plus the progress bar, TensorBoard and W&B when asked."""
    return MetricsLogger(session.out, enabled=session.rank == 0, total_steps=total_steps,
                         run_name=cfg.run_name or session.out.name, config=cfg.to_dict(),
                         progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                         wandb_project=cfg.wandb_project)


def resume(engine, session: Session, fingerprint: str, logger: MetricsLogger,
           unit: str = "step") -> int:
    """Load the latest complete checkpoint (if any) and return the step it ends; the progress
    bar moves on to it."""
    state = resume_latest(engine, session.checkpoints, fingerprint)
    if state is None:
        return 0
    step = int(state["step"])
    logger.message(f"[halos] resumed from {state['path']} at {unit} {step}")
    logger.advance(step)
    return step


def finish_run(cfg: TrainConfig, session: Session, logger: MetricsLogger) -> None:
    """After the export: wait for every rank, drop the checkpoints (unless kept), close sinks."""
    barrier()
    if session.rank == 0 and not cfg.keep_checkpoints:
        shutil.rmtree(session.checkpoints, ignore_errors=True)
    logger.close()


def check_fits(model: torch.nn.Module, cfg: TrainConfig, length: int | None = None,
               what: str | None = None) -> None:
    """The longest sequence a command builds (default --max-length) must fit the model."""
    limit = getattr(model.config, "max_position_embeddings", None)
    length = cfg.max_length if length is None else length
    what = what or f"--max-length {cfg.max_length}"
    if limit is not None and length > limit:
        raise ConfigError(f"{what} exceeds what {cfg.model} supports "
                          f"(max_position_embeddings = {limit}); lower it")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
