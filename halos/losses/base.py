"""The loss interface: what a loss needs from the trainer, and what it gives back.

A loss never sees token ids or models. The trainer computes per-sequence log-probs of the policy
(and reads the reference's from the precomputed file) in the shape the loss declares, then calls
`loss(policy, reference)`. Everything specific to a method lives in its subclass.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

BatchKind = Literal["sft", "paired", "unpaired"]


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


Logps = PairedLogps | UnpairedLogps | SFTLogps


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
    # "causal_lm": the trainer passes log-probs of the responses. "value_head": a reward model;
    # the trainer passes one scalar score per sequence in the same fields (e.g. PairedLogps.chosen).
    model_head: ClassVar[Literal["causal_lm", "value_head"]] = "causal_lm"
    # Tokens added to the tokenizer (and the embedding matrix) before training, e.g. CSFT's.
    extra_special_tokens: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = ""

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
