"""LoRA adapters (peft) for every trained model: SFT, every alignment loss, the reward model (its
value head stays fully trained) and online PPO's policy and value model.

With `--lora-r R` the causal LM is wrapped by `peft.get_peft_model` right after loading (under
ZeRO-3 the frozen base stays sharded; DeepSpeed partitions the adapters at initialize), so the
optimizer holds the adapters (and a value head) only, and checkpoints hold only what trains: the
frozen base is loaded again from --model on resume.

The export writes two folders of a run:

    out/adapter/    adapter_model.safetensors + adapter_config.json (PeftModel.from_pretrained on
                    the base model; value_head.safetensors beside them for a reward model)
    out/model/      the merged full model (peft's merge_and_unload): an ordinary causal-LM folder,
                    so evaluation, sampling, `halos ref-logps` and an `sft+…` row on top of a LoRA
                    SFT read it as they read any model

Both are rebuilt on rank 0 from the consolidated state dict (ZeRO-3 gathers it as for a full
run), on the CPU: a model built from the trained model's config, the same LoRA config, the
trained weights loaded exactly, the adapter saved, then merged by peft and saved.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from halos.config import ConfigError, TrainConfig
from halos.suite.paths import ADAPTER_DIR
from halos.train.checkpoints import export_hf_folder, write_hf_folder
from halos.train.distributed import is_main
from halos.train.outdir import raise_on_any_rank, write_failure

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Every linear projection of the attention and MLP blocks, by config.json `model_type`; another
# family gets peft's "all-linear" (every nn.Linear but the LM head).
DEFAULT_TARGETS = {
    **{kind: _LLAMA_LIKE for kind in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                                      "gemma2", "gemma3_text", "olmo", "olmo2", "smollm3")},
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
ALL_LINEAR = "all-linear"


def enabled(cfg: TrainConfig) -> bool:
    return cfg.lora_r > 0


def target_modules(option: str, model_type: str) -> list[str] | str:
    """The modules to adapt: `--lora-target-modules` (names, or all-linear), else the family's."""
    names = [name.strip() for name in option.split(",") if name.strip()]
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    return names or DEFAULT_TARGETS.get(model_type, ALL_LINEAR)


def lora_config(cfg: TrainConfig, model: nn.Module, base: str | None = None):
    """peft's LoraConfig from the run options; the adapter names `base` (--model) as its base."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules(cfg.lora_target_modules,
                                                    model.config.model_type),
                      task_type="CAUSAL_LM", base_model_name_or_path=base or cfg.model)


def wrap(model: nn.Module, cfg: TrainConfig, base: str | None = None) -> nn.Module:
    """The causal LM with LoRA adapters (trainable) on its frozen weights (unchanged without
    --lora-r). With activation checkpointing the embeddings' output requires grad, so that the
    recomputed segments have a gradient path although every weight before them is frozen."""
    if not enabled(cfg):
        return model
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, lora_config(cfg, model, base))
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"--lora-target-modules {cfg.lora_target_modules!r} on "
                          f"{base or cfg.model}: "
                          f"{str(err).splitlines()[0]}") from err
    if cfg.activation_checkpointing:
        wrapped.enable_input_require_grads()
    return wrapped


def has_adapters(module: nn.Module) -> bool:
    from peft import PeftModel

    return any(isinstance(m, PeftModel) for m in module.modules())


def trainable_summary(module: nn.Module) -> str:
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()
                    if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return f"LoRA: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"


# ----------------------------------------------------------------------------- export


def export_model(wrapper: nn.Module, state: dict[str, torch.Tensor] | None, tokenizer,
                 final: Path, extra_files: dict[str, dict], checkpoints: Path,
                 adapter: Path | None = None) -> None:
    """The trained wrapper (log-prob, value-head or PPO module whose causal LM is `.model`) as
    model/ (merged, if it has adapters) and, with adapters, the adapter folder. Every rank calls
    it; `state` (the wrapper's consolidated state dict) is rank 0's, None elsewhere."""
    if not has_adapters(wrapper):
        export_hf_folder(wrapper, state, tokenizer, final, extra_files, checkpoints)
        return
    adapter = adapter or final.parent / ADAPTER_DIR
    merged_state, error = None, None
    if is_main():
        rebuilt = rebuilt_peft_model(wrapper.model, _lm_part(state))
        others = {k: v for k, v in state.items() if not k.startswith("model.")}
        error = write_failure(lambda: _write_adapter(wrapper, rebuilt, others, tokenizer, adapter,
                                                     extra_files), adapter.parent)
        merged = rebuilt.merge_and_unload()
        merged_state = {**_with_lm_prefix(merged.state_dict()), **others}
        wrapper = _rebound(wrapper, merged)
    raise_on_any_rank(f"could not write the adapter {adapter} ({error})" if error else None)
    export_hf_folder(wrapper, merged_state, tokenizer, final, extra_files, checkpoints)


def rebuilt_peft_model(trained: nn.Module, lm_state: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU copy of the trained PeftModel (`trained` may be ZeRO-3 sharded) holding `lm_state`:
    the model built from its config, the same LoRA config, every weight loaded."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = next(iter(lm_state.values())).dtype
    base = AutoModelForCausalLM.from_config(trained.get_base_model().config, dtype=dtype)
    rebuilt = get_peft_model(base, copy.deepcopy(trained.peft_config["default"]))
    load_exactly(rebuilt, lm_state)
    return rebuilt.eval()


def load_exactly(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that allows missing keys only for tied weights (the LM head tied to the
    embeddings is saved once)."""
    result = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"LoRA export: the trained state does not match the rebuilt model "
                           f"(missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})")


def _lm_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def _with_lm_prefix(lm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The causal LM's state under the wrapper's `model.` prefix (the inverse of _lm_part)."""
    return {f"model.{k}": v for k, v in lm_state.items()}


def _rebound(wrapper: nn.Module, causal_lm: nn.Module) -> nn.Module:
    """A shallow copy of `wrapper` whose `.model` is `causal_lm`: its own save_pretrained then
    writes that model (plus, for a value-head wrapper, the head from the state it is given)."""
    twin = copy.copy(wrapper)
    twin._modules = {**wrapper._modules, "model": causal_lm}
    return twin


def _vocabulary_grew(peft_model: nn.Module) -> bool:
    """Did the run add tokens (a loss's control tokens) to the base's vocabulary? Then the
    adapter also holds the resized embeddings (and LM head): load it on a base whose
    embeddings were resized to the tokenizer (`resize_token_embeddings(len(tokenizer))`)."""
    from transformers import AutoConfig

    config = peft_model.get_base_model().config
    try:
        base = AutoConfig.from_pretrained(peft_model.peft_config["default"].base_model_name_or_path)
    except OSError:
        return False
    return config.vocab_size > base.vocab_size


def _write_adapter(wrapper: nn.Module, rebuilt: nn.Module, others: dict[str, torch.Tensor],
                   tokenizer, adapter: Path, extra_files: dict[str, dict]) -> None:
    """The adapter folder: peft's files, any value head, the tokenizer and the training summary
    (so that sampling and evaluation read an adapter folder as they read model/)."""
    write_hf_folder(_rebound(wrapper, rebuilt), {**_with_lm_prefix(rebuilt.state_dict()), **others},
                    tokenizer, adapter, extra_files, save_embedding_layers=_vocabulary_grew(rebuilt))
