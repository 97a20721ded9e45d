"""The two commands that run models: `train` (sft, align) and `reference_logps` (ref-logps).

Read top to bottom: config → process group → loss → model and tokenizer → data → schedule →
DeepSpeed engine → fit → save.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from halos import engine as eng
from halos.batching import collate, plan_steps
from halos.config import ConfigError, TrainConfig
from halos.dataview import DataView, load_view
from halos.losses import build_loss
from halos.losses.base import AlignmentLoss
from halos.metrics import MetricsLogger
from halos.ops import CausalLMLogps
from halos.reflogps import ReferenceLogps, model_identity, write_reference_file
from halos.trainer import Trainer

FINAL_MODEL = "model"


def train(cfg: TrainConfig) -> Path:
    cfg.validate()
    loss = build_loss(cfg.loss, cfg.loss_params)
    out = Path(cfg.out)
    final, rank, world, ds = start_run(cfg)

    model, tokenizer = eng.load_causal_lm(cfg.model, ds, loss.extra_special_tokens)
    check_fits(model, cfg)
    train_data = load_view(cfg, loss, tokenizer, "train")
    held_out = load_view(cfg, loss, tokenizer, "test") if cfg.eval_examples else None
    reference = open_reference(cfg, loss, [train_data, held_out])

    plan = plan_steps(train_data.lengths(), micro_batch_size=cfg.micro_batch_size,
                      grad_accum=cfg.gradient_accumulation_steps, world_size=world,
                      epochs=cfg.epochs, seed=cfg.seed, bucketing=cfg.length_bucketing,
                      labels=train_data.labels())
    if cfg.max_steps:
        plan = plan[: cfg.max_steps]
    if not plan:
        per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world
        raise ConfigError(f"{cfg.data}: {len(train_data)} training examples are fewer than one "
                          f"optimizer step needs ({per_step} = micro batch × accumulation × "
                          f"processes); lower --micro-batch-size or add data")

    for warning in loss.dataset_warnings(train_data.label_counts()):
        print(f"[halos] warning: {warning}", flush=True)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = trainable_module(model, loss, cfg)
    engine = eng.build_engine(module, ds, cfg, total_steps=len(plan))
    logger = MetricsLogger(out, enabled=rank == 0, total_steps=len(plan),
                           run_name=cfg.run_name or out.name, config=cfg.to_dict(),
                           progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                           wandb_project=cfg.wandb_project)
    trainer = Trainer(engine, loss, train_data, held_out, plan, cfg, logger, reference,
                      eng.zero_stage(ds))
    final_eval = trainer.fit()

    state = eng.consolidated_state_dict(engine, ds)
    summary = {"config": cfg.to_dict(), "loss": loss.name, "steps": len(plan),
               "world_size": world, "final_eval": final_eval}
    eng.export_hf_folder(module, state, tokenizer, final, {"halos_training.json": summary})
    eng.barrier()
    if rank == 0 and not cfg.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    logger.close()
    return final


def start_run(cfg: TrainConfig) -> tuple[Path, int, int, dict]:
    """Refuse to overwrite a finished model, join the process group, seed everything and fill
    the DeepSpeed config: (final model folder, rank, world size, DeepSpeed config)."""
    final = Path(cfg.out) / FINAL_MODEL
    if final.exists() and not cfg.overwrite:
        raise ConfigError(f"{final} already holds a finished model; pass --overwrite to retrain")
    rank, world = eng.init_distributed()
    seed_everything(cfg.seed)
    return final, rank, world, eng.deepspeed_config(cfg)


def check_fits(model: torch.nn.Module, cfg: TrainConfig) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds what {cfg.model} supports "
                          f"(max_position_embeddings = {limit}); lower --max-length")


def trainable_module(model: torch.nn.Module, loss: AlignmentLoss,
                     cfg: TrainConfig) -> torch.nn.Module:
    """What DeepSpeed trains: the LM returning log-probs (per sequence or per token), the LM +
    value head returning scores (a reward model), or the LM and a value head together (PPO)."""
    from halos.value_head import PolicyValueModel, ValueHeadModel

    if loss.model_head == "value_head":
        return ValueHeadModel(model)
    if loss.model_head == "causal_lm_value_head":
        return PolicyValueModel(model, chunk_size=cfg.logits_chunk_size)
    return CausalLMLogps(model, cfg.logits_chunk_size, token_level=loss.token_level)


def open_reference(cfg: TrainConfig, loss: AlignmentLoss,
                   views: list[DataView | None]) -> ReferenceLogps | None:
    """Load and check the reference file before any training step."""
    if not loss.needs_reference:
        return None
    if not cfg.ref_logps:
        raise ConfigError(f"loss {loss.name!r} needs --ref-logps (compute it with "
                          f"`halos ref-logps --model {cfg.model} --data {cfg.data}`)")
    reference = ReferenceLogps(cfg.ref_logps)
    reference.check_model(cfg.reference_model or cfg.model)
    if loss.token_level:
        reference.require_tokens()
    for view in views:
        if view is not None and len(view):
            reference.check_covers(collate(view.sequences(), view.pad_id, "sft", 0).keys)
    return reference


def reference_logps(cfg: TrainConfig) -> Path:
    """Score every sequence any loss may need on `cfg.data` with the reference model, once."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to recompute")
    rank, world = eng.init_distributed()
    ds = eng.deepspeed_config(cfg)
    model, tokenizer = eng.load_causal_lm(cfg.model, ds)
    check_fits(model, cfg)
    sequences = _all_reference_sequences(cfg, tokenizer)
    engine = eng.build_engine(CausalLMLogps(model, cfg.logits_chunk_size, token_level=True), ds,
                              None)

    # Longest first in fixed-size batches, dealt round-robin; all ranks run the same count.
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    size = cfg.micro_batch_size * 2
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    rounds = -(-len(chunks) // world)
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for r in range(rounds):
            i = r * world + rank
            indices = chunks[min(i, len(chunks) - 1)]
            batch = collate([sequences[j] for j in indices], tokenizer.pad_token_id, "sft", 0)
            device = engine.device
            grid, mask = engine(batch.input_ids.to(device), batch.attention_mask.to(device),
                                batch.loss_mask.to(device))
            if i < len(chunks):
                grid, mask = grid.float().cpu(), mask.cpu()
                # The flat per-token log-probs are row after row, each row's in order.
                results.append((batch.keys, grid.sum(-1), mask.sum(-1), grid[mask]))
    gathered = [results] if world == 1 else _gather(results, world)
    if rank == 0:
        keys, sums, counts, token_logps = _merge(gathered)
        write_reference_file(out, keys, sums, counts, model=cfg.model,
                             identity=model_identity(cfg.model), data_fingerprint=_fingerprint(keys),
                             token_logps=token_logps)
        print(f"[halos] wrote reference log-probs of {len(keys)} sequences to {out}", flush=True)
    eng.barrier()
    return out


def _all_reference_sequences(cfg: TrainConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The union of sequences the paired and unpaired (with KL pairs) views of the data score."""
    from halos.losses import get_loss_class

    probe = get_loss_class("sft")()  # only for prompt suffixes (none) when building views
    cfg = dataclasses.replace(cfg, eval_examples=0)  # every held-out row: runs may use any prefix
    unique: dict[tuple[tuple[int, ...], tuple[int, ...]], None] = {}
    first = json.loads((Path(cfg.data) / "train.jsonl").open().readline() or "{}")
    views = _choices(cfg.ref_views, {"paired", "unpaired"}, "--ref-views")
    kinds = [k for k in ("paired", "unpaired") if k in views and ("chosen" in first or k != "paired")]
    for split in _choices(cfg.ref_splits, {"train", "test"}, "--ref-splits"):
        if not (Path(cfg.data) / f"{split}.jsonl").is_file():
            continue
        for kind in kinds:
            view = load_view(cfg, probe, tokenizer, split, kind=kind, with_kl=kind == "unpaired")
            for prompt, response in view.sequences():
                unique[(tuple(prompt), tuple(response))] = None
    return [(list(p), list(r)) for p, r in unique]


def _choices(value: str, allowed: set[str], option: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(chosen) - allowed)
    if unknown or not chosen:
        raise ConfigError(f"{option} {value!r}: choose a comma-separated subset of {sorted(allowed)}")
    return chosen


def _gather(results: list, world: int) -> list | None:
    """Every rank's results on rank 0 (None elsewhere): the per-token log-probs are large."""
    gathered: list | None = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(results, gathered, dst=0)
    return gathered


def _merge(gathered: list) -> tuple[torch.Tensor, ...]:
    """Concatenate each field of the (keys, sums, counts, token log-probs) of every batch."""
    batches = [batch for results in gathered for batch in results]
    return tuple(torch.cat(field) for field in zip(*batches, strict=True))


def _fingerprint(keys: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(torch.sort(keys).values.numpy().tobytes()).hexdigest()[:32]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
