"""DeepSpeed setup shared by every command: the config (its "auto" fields filled from the run
options), model loading (sharded under ZeRO-3), the engine with AdamW and the LR schedule."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch

from halos.config import ConfigError, TrainConfig, resolve_deepspeed_config, resolve_model
from halos.data.templates import resolve_chat_template


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


def load_causal_lm(path: str, ds: dict[str, Any], extra_tokens: tuple[str, ...] = (),
                   option: str = "--model", *, attn_implementation: str = "sdpa",
                   chat_template: str = ""):
    """Load a causal LM (and its tokenizer) by hub id or folder; under ZeRO-3 it loads sharded.
    `path` is resolved first (`halos.config.resolve_model`), so a missing folder or a folder that
    is no model is a one-line error naming `option`, never a Hub lookup; so is an attention
    kernel that is not installed. `attn_implementation`, `chat_template`: the models table's
    columns; a chat template given replaces the tokenizer's own, so that the exported folder
    renders conversations as training did."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    is_folder = Path(resolve_model(path, option)).expanduser().is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        if is_folder:
            raise
        raise ConfigError(f"{option} {path!r}: {str(err).splitlines()[0]}") from err
    check_attention(attn_implementation)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)},
                                         replace_extra_special_tokens=False) if extra_tokens else 0
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    keep_alive = None
    if zero_stage(ds) == 3:
        # Tells from_pretrained to build the model under deepspeed.zero.Init, partitioned.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    del keep_alive
    return model, tokenizer


def check_attention(attn_implementation: str) -> None:
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("--attn-implementation flash_attention_2 needs the flash-attn package "
                          "(pip install flash-attn --no-build-isolation, on a CUDA machine); "
                          "or use sdpa")


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
