"""Online PPO's four models: the policy and value model trained together in one module (as
TRL's PolicyAndValueWrapper: one engine, optimizer, checkpoint and export), and the frozen
reference and reward models (inference engines, sharded, under ZeRO-3)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from halos.config import ConfigError
from halos.models import VALUE_HEAD_FILE
from halos.models.value_head import ValueHeadModel, load_value_head
from halos.train import engine as eng
from halos.train.logps import (
    CausalLMLogps,
    backbone_hidden,
    chunk_starts,
    output_head,
    token_logps_from_hidden,
)


class _Tempered(nn.Module):
    """The LM head with its logits divided by the sampling temperature."""

    def __init__(self, head: nn.Module, temperature: float) -> None:
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) / self.temperature


class SampledTokenLogps(CausalLMLogps):
    """A causal LM whose forward returns the log-probs of the scored tokens on the (N, T-1) grid
    of `halos.ops.token_logps_from_hidden`, from logits divided by `temperature` (as sampled),
    and, when asked, the mean entropy of the distributions at those positions."""

    def __init__(self, model: nn.Module, chunk_size: int, temperature: float) -> None:
        super().__init__(model, chunk_size)
        self.temperature = temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = backbone_hidden(self.model, input_ids, attention_mask)  # (N, T, H)
        head = output_head(self.model)
        if self.temperature != 1.0:
            head = _Tempered(head, self.temperature)
        grid, scored = token_logps_from_hidden(hidden, input_ids, loss_mask, head, self.chunk_size)
        if not with_entropy:
            return grid.float(), None
        return grid.float(), _mean_entropy(hidden[:, :-1][scored].detach(), head, self.chunk_size)


@torch.no_grad()
def _mean_entropy(hidden: torch.Tensor, head: nn.Module, chunk_size: int) -> torch.Tensor:
    """Mean entropy of softmax(head(h)) over the rows of `hidden` (M, H), `chunk_size` at once."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in chunk_starts(hidden.shape[0], chunk_size, head):
        logps = torch.log_softmax(head(hidden[start : start + chunk_size]).float(), dim=-1)
        total += -(logps.exp() * logps).sum()
    return total / max(1, hidden.shape[0])


class PolicyAndValue(nn.Module):
    """The two trained models in one module: one engine, optimizer, checkpoint and export."""

    def __init__(self, policy: SampledTokenLogps, value: ValueHeadModel) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Policy log-probs, values (both (N, T-1) float32) and the policy's mean entropy."""
        logps, entropy = self.policy(input_ids, attention_mask, loss_mask, with_entropy)
        return logps, self.value.token_values(input_ids, attention_mask), entropy

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.policy.model.gradient_checkpointing_enable(**kwargs)
        self.value.gradient_checkpointing_enable(**kwargs)


def load_lm(path: str, ds: dict, tokenizer, option: str) -> nn.Module:
    """A causal LM (ZeRO-3: loaded sharded) whose tokenizer must be the policy's."""
    model, other = eng.load_causal_lm(path, ds)
    if other.get_vocab() != tokenizer.get_vocab() or other.eos_token_id != tokenizer.eos_token_id:
        raise ConfigError(f"--{option.replace('_', '-')} {path!r}: its tokenizer differs from "
                          f"--model's; the four PPO models must share one tokenizer")
    return model


def load_value_model(path: str, ds: dict, tokenizer, option: str) -> ValueHeadModel:
    """LM + value head from `path` (a new head if the folder has none)."""
    model = load_lm(path, ds, tokenizer, option)
    head = None
    if (Path(path) / VALUE_HEAD_FILE).is_file():
        head = load_value_head(path).to(dtype=next(model.parameters()).dtype)
    return ValueHeadModel(model, head)


def frozen(module: nn.Module, ds: dict, device: torch.device):
    """A model that is never trained: under ZeRO-3 an inference engine (sharded, no optimizer),
    else a plain eval-mode module on the device."""
    module.requires_grad_(False)
    if eng.zero_stage(ds) == 3:
        return eng.build_engine(module, copy.deepcopy(ds), None)
    return module.to(device).eval()
