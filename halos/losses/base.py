"""The loss interface: what a loss needs from the trainer, and what it gives back.

A loss never sees token ids or models. The trainer computes per-sequence log-probs of the policy
(per-token ones for a `token_level` loss) and reads the reference's from the precomputed file, in
the shape the loss declares, then calls `loss(policy, reference)`. Everything specific to a method
lives in its subclass.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

BatchKind = Literal["sft", "paired", "unpaired"]
ModelHead = Literal["causal_lm", "value_head", "causal_lm_value_head"]


@dataclass
class PairedLogps:
    """Log-probs of the chosen and rejected responses of B pairs, each (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class UnpairedLogps:
    """Log-probs of B (prompt, completion) examples and their labels, each (B,).

    `kl` holds the log-probs of mismatched (prompt_i, completion_j≠i) pairs when the loss asks
    for them (`needs_kl_pairs`); they are computed without gradient.
    """

    completion: torch.Tensor
    tokens: torch.Tensor
    desirable: torch.Tensor  # bool
    kl: torch.Tensor | None = None


@dataclass
class SFTLogps:
    """Summed log-probs of B target responses and their token counts, each (B,)."""

    completion: torch.Tensor
    tokens: torch.Tensor


@dataclass
class TokenLogps:
    """Per-token log-probs of N sequences on the (N, T-1) next-token grid of
    `halos.ops.token_logps_from_hidden`: logps[n, t] = log p(token t+1 | tokens ≤ t) where
    `mask[n, t]` is set (the response tokens), else 0.

    `values` holds the value head's V_t on the same grid (model head "causal_lm_value_head"; None
    for the reference); `desirable` (N,) the labels of an unpaired batch, else None.
    """

    logps: torch.Tensor
    mask: torch.Tensor  # bool
    desirable: torch.Tensor | None = None
    values: torch.Tensor | None = None


Logps = PairedLogps | UnpairedLogps | SFTLogps | TokenLogps


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,) per example; the trainer optimises their mean
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars or (B,) tensors


class AlignmentLoss(nn.Module):
    """Base class. Subclasses set the class attributes and implement `loss`.

    Hyperparameters are keyword arguments of `__init__` with defaults; the CLI and the config
    validation read them from the signature, so declaring them there is all a loss has to do.
    """

    batch_kind: ClassVar[BatchKind] = "paired"
    needs_reference: ClassVar[bool] = True
    average_logps: ClassVar[bool] = False  # length-normalised instead of summed log-probs
    needs_kl_pairs: ClassVar[bool] = False  # unpaired losses: also score mismatched pairs
    # The trainer passes `TokenLogps` (per-token log-probs, the reference's per-token ones from
    # the file) instead of per-sequence sums, e.g. for PPO.
    token_level: ClassVar[bool] = False
    # "causal_lm": the trainer passes log-probs of the responses. "value_head": a reward model;
    # the trainer passes one scalar score per sequence in the same fields (e.g. PairedLogps.chosen).
    # "causal_lm_value_head": the LM and a value head on its backbone (TRL's
    # AutoModelForCausalLMWithValueHead), trained together; needs `token_level` (the values go in
    # TokenLogps.values). Its model folder is an ordinary causal LM plus value_head.safetensors.
    model_head: ClassVar[ModelHead] = "causal_lm"
    # Tokens added to the tokenizer (and the embedding matrix) before training, e.g. CSFT's.
    extra_special_tokens: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.model_head == "causal_lm_value_head" and not cls.token_level:
            raise TypeError(f"{cls.__name__}: model_head 'causal_lm_value_head' gives per-token "
                            f"values; declare token_level = True")
        if cls.token_level and cls.needs_kl_pairs:
            raise TypeError(f"{cls.__name__}: token-level losses cannot ask for KL pairs")

    def prompt_suffix(self, desirable: bool) -> str:
        """Text appended to the prompt of a (desirable or not) example, e.g. a control token."""
        return ""

    def dataset_warnings(self, counts: Mapping[str, int]) -> list[str]:
        """Warnings about the training data for this loss, given its "desirable"/"undesirable"
        example counts (e.g. KTO's recommended weight ratio)."""
        return []

    def forward(self, policy: Logps, reference: Logps | None = None) -> LossOutput:
        if self.needs_reference and reference is None:
            raise ValueError(f"loss {self.name!r} needs reference log-probs")
        return self.loss(policy, reference)

    def loss(self, policy: Logps, reference: Logps | None) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    @classmethod
    def hyperparameters(cls) -> dict[str, inspect.Parameter]:
        named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params = inspect.signature(cls.__init__).parameters
        return {k: p for k, p in params.items() if k != "self" and p.kind in named}


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       policy: PairedLogps) -> dict[str, torch.Tensor]:
    """The metrics every paired loss reports (TRL's names)."""
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().detach(),
        "rewards/margin": (chosen_rewards - rejected_rewards).detach(),
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
        "logps/margin": (policy.chosen - policy.rejected).detach(),
    }


def label_sums(values: torch.Tensor, desirable: torch.Tensor,
               prefix: str) -> dict[str, torch.Tensor]:
    """`{prefix}/desirable_sum`, `{prefix}/desirable_count` and the same for undesirable, of
    `values` (B,) by label: sums and counts, not means, since a microbatch may hold one label
    only; the trainer reports each pair's ratio, the mean (`means_from_sums`)."""
    values, metrics = values.detach(), {}
    for name, mask in (("desirable", desirable), ("undesirable", ~desirable)):
        metrics[f"{prefix}/{name}_sum"] = (values * mask).sum()
        metrics[f"{prefix}/{name}_count"] = mask.sum().to(values.dtype)
    return metrics
