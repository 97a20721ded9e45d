"""Maths shared by several losses, as pure functions on per-sequence log-prob tensors (B,)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from halos.losses.base import PairedLogps

LOG_HALF = -math.log(2.0)


def reference_logratios(policy: PairedLogps,
                        reference: PairedLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) − log π_ref(y|x) of the chosen and of the rejected responses, each (B,)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x): binary cross-entropy of the Bradley–Terry preference
    probability σ(x) against a label that is flipped with probability ε."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def sequence_nll(logps: torch.Tensor, tokens: torch.Tensor, averaged: bool) -> torch.Tensor:
    """Per-sequence, length-normalised NLL −log π(y|x)/|y|, given summed or averaged log-probs."""
    return -logps if averaged else -logps / tokens.clamp(min=1)


def token_mean_nll(logps: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT's microbatch token mean −Σ_i log π(y_i|x_i) / Σ_i |y_i|, as B per-example values whose
    mean is exactly that token mean; also returns the token mean itself (detached)."""
    total_tokens = tokens.sum().clamp(min=1)
    losses = -logps * tokens.numel() / total_tokens
    return losses, (-logps.detach().sum() / total_tokens)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler, 2012: use log(−expm1(x)) for
    x > −log 2 and log1p(−exp(x)) below). Each branch sees only inputs in its own range, so the
    branch torch.where discards cannot put NaN into the gradient."""
    near_zero = torch.log(-torch.expm1(x.clamp(min=LOG_HALF)))
    far = torch.log1p(-torch.exp(x.clamp(max=LOG_HALF)))
    return torch.where(x > LOG_HALF, near_zero, far)


@torch.no_grad()
def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a scalar over the data-parallel ranks (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def means_from_sums(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` plus `k = k_sum / k_count` for every `k_sum`, `k_count` pair (NaN if the count is 0).

    Losses report sums and counts where a microbatch may hold none of a group (KTO's desirable
    and undesirable rewards); call this once sums and counts are aggregated over microbatches and
    ranks (averaged or summed alike: the ratio is the same).
    """
    out = dict(metrics)
    for key, total in metrics.items():
        if key.endswith("_sum") and f"{key[:-4]}_count" in metrics:
            count = metrics[f"{key[:-4]}_count"]
            out[key[:-4]] = total / count if count else float("nan")
    return out
