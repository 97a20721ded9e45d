"""`halos sft` and `halos align`: one run of the one trainer, read top to bottom.

config → session (process group, seed, DeepSpeed config) → loss → model and tokenizer → data →
step plan → DeepSpeed engine → fit (halos/train/loop.py) → export the Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from halos.config import ConfigError, TrainConfig
from halos.losses import build_loss
from halos.losses.base import AlignmentLoss
from halos.plan.peak import peak_memory
from halos.train import engine as eng
from halos.train import lora
from halos.train.batching import collate, plan_steps
from halos.train.checkpoints import consolidated_state_dict
from halos.train.dataview import DataView, load_view
from halos.train.logps import CausalLMLogps
from halos.train.loop import Trainer
from halos.train.reference import ReferenceLogps, ReferenceMismatch
from halos.train.reference_pass import IN_RUN_FILE, reference_in_run
from halos.train.session import check_fits, check_space, finish_run, open_logger, start_run


def train(cfg: TrainConfig) -> Path:
    cfg.validate()
    loss = build_loss(cfg.loss, cfg.loss_params)
    session = start_run(cfg)
    model, tokenizer = eng.load_causal_lm(cfg.model, session.ds, loss.extra_special_tokens,
                                           attn_implementation=cfg.attn_implementation,
                                           chat_template=cfg.chat_template)
    check_fits(model, cfg)
    check_space(model, session.out, session.rank)
    train_data = load_view(cfg, loss, tokenizer, "train")
    held_out = load_view(cfg, loss, tokenizer, "test") if cfg.eval_examples else None
    views = [train_data, held_out]
    reference = open_reference(cfg, loss, views) if cfg.ref_logps else None
    plan = step_plan(cfg, train_data, session.world)
    for warning in loss.dataset_warnings(train_data.label_counts()):
        print(f"[halos] warning: {warning}", flush=True)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = lora.wrap(model, cfg)  # without --lora-r: the model itself
    module = trainable_module(model, loss, cfg)
    if lora.enabled(cfg) and session.rank == 0:
        print(f"[halos] {lora.trainable_summary(module)}", flush=True)
    engine = eng.build_engine(module, session.ds, cfg, total_steps=len(plan))
    if loss.needs_reference and reference is None:  # scored here, before any step or resume
        reference = reference_of_run(engine, cfg, loss, views, session)
    logger = open_logger(cfg, session, len(plan))
    trainer = Trainer(engine, loss, train_data, held_out, plan, cfg, logger, reference, session)
    final_eval = trainer.fit()

    state = consolidated_state_dict(engine, session.ds)
    summary = {"config": cfg.to_dict(), "loss": loss.name, "steps": len(plan),
               "world_size": session.world, "final_eval": final_eval,
               "peak_memory": peak_memory()}
    lora.export_model(module, state, tokenizer, session.final, {"halos_training.json": summary},
                      session.checkpoints)
    finish_run(cfg, session, logger)
    return session.final


def step_plan(cfg: TrainConfig, train_data: DataView, world: int) -> list[list[list[int]]]:
    """Every optimizer step's microbatches (example indices), fixed before the first step."""
    plan = plan_steps(train_data.lengths(), micro_batch_size=cfg.micro_batch_size,
                      grad_accum=cfg.gradient_accumulation_steps, world_size=world,
                      epochs=cfg.epochs, seed=cfg.seed, bucketing=cfg.length_bucketing,
                      labels=train_data.labels(), groups=train_data.prompt_groups())
    if cfg.max_steps:
        plan = plan[: cfg.max_steps]
    if not plan:
        per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world
        raise ConfigError(f"{cfg.data}: {len(train_data)} training examples are fewer than one "
                          f"optimizer step needs ({per_step} = micro batch × accumulation × "
                          f"processes); lower --micro-batch-size or add data")
    return plan


def trainable_module(model: torch.nn.Module, loss: AlignmentLoss,
                     cfg: TrainConfig) -> torch.nn.Module:
    """What DeepSpeed trains: the LM returning log-probs (per sequence or per token), the LM +
    value head returning scores (a reward model), or the LM and a value head together (PPO)."""
    from halos.models.value_head import PolicyValueModel, ValueHeadModel

    if loss.model_head == "value_head":
        return ValueHeadModel(model)
    if loss.model_head == "causal_lm_value_head":
        return PolicyValueModel(model, chunk_size=cfg.logits_chunk_size)
    return CausalLMLogps(model, cfg.logits_chunk_size, token_level=loss.token_level)


def reference_of_run(engine, cfg: TrainConfig, loss: AlignmentLoss, views: list[DataView | None],
                     session) -> ReferenceLogps:
    """Without --ref-logps: OUT/ref_logps.pt, scored by this run's engine (reference_in_run); a
    file an earlier attempt of this run left is reused if it still matches, else rescored."""
    path = session.out / IN_RUN_FILE
    if path.is_file():
        try:
            return open_reference(cfg, loss, views, str(path))
        except ReferenceMismatch as err:  # the same verdict on every rank: the same file
            print(f"[halos] rescoring {path}: {err}", flush=True)
    # Rank 0 replaces the file atomically after scoring, which every rank takes part in.
    reference_in_run(engine, cfg, views, session.rank, session.world, path)
    return open_reference(cfg, loss, views, str(path))


def open_reference(cfg: TrainConfig, loss: AlignmentLoss, views: list[DataView | None],
                   path: str | None = None) -> ReferenceLogps | None:
    """Load and check the reference file (`path`, default --ref-logps) before any step."""
    if not loss.needs_reference:
        return None
    reference = ReferenceLogps(path or cfg.ref_logps)
    reference.check_model(cfg.reference_model or cfg.model)
    if loss.token_level:
        reference.require_tokens()
    for view in views:
        if view is not None and len(view):
            reference.check_covers(collate(view.sequences(), view.pad_id, "sft", 0).keys)
    return reference
