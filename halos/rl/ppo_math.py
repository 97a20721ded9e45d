"""PPO's maths, shared by online PPO (`halos ppo`) and Archangel's offline PPO loss (`ppo`).

Every function takes right-padded per-token tensors (B, T) and a boolean `mask` (B, T) of the
response tokens; positions outside the mask never contribute. Formulas and names follow
Schulman et al. 2017 (PPO, eq. 7 and 9), GAE (Schulman et al. 2016, eq. 16) and TRL's PPO trainer,
so a run's metrics read like TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var: need at least two unmasked values to whiten")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − mean) / std over the masked entries; with `shift_mean=False` the mean is added
    back (only the scale changes), as for `whiten_rewards`. Masked-out entries become 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (GAE paper, eq. 16), per token, right-padded.

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with V = 0 and r = 0 past the end of
    each response. Returns (advantages, returns = advantages + values), both zero off the mask;
    advantages are not whitened (see `masked_whiten`).
    """
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    length = rewards.shape[1]
    last = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * m
    return advantages, (advantages + values) * m


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, masked token mean
    per_sequence: torch.Tensor  # (B,) masked mean per sequence (B·loss when lengths are equal)
    clipfrac: torch.Tensor  # scalar: share of tokens where the clipped term was used
    approxkl: torch.Tensor  # scalar: ½·E[(log π − log π_old)²]
    ratio: torch.Tensor  # (B, T) π/π_old


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> PolicyLoss:
    """PPO's clipped surrogate (PPO paper, eq. 7), as a loss to minimise, per token:
    max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = exp(log π − log π_old)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.max(unclipped, clipped)
    return PolicyLoss(
        loss=masked_mean(per_token, mask),
        per_sequence=masked_mean(per_token, mask, dim=1),
        clipfrac=masked_mean((clipped > unclipped).float(), mask).detach(),
        approxkl=(0.5 * masked_mean(log_ratio.detach() ** 2, mask)),
        ratio=ratio.detach(),
    )


@dataclass
class ValueLoss:
    loss: torch.Tensor  # scalar: ½ · masked token mean of the clipped squared error
    per_sequence: torch.Tensor  # (B,)
    clipfrac: torch.Tensor  # scalar


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float) -> ValueLoss:
    """½·max((V − R)², (clip(V, V_old ± ε_v) − R)²) per token (PPO2's clipped value loss)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.max(unclipped, clipped)
    return ValueLoss(
        loss=masked_mean(per_token, mask),
        per_sequence=masked_mean(per_token, mask, dim=1),
        clipfrac=masked_mean((clipped > unclipped).float(), mask).detach(),
    )


def last_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) zeros with each sequence's score (B,) at its last response token."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)  # (B,)
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] = scores[has_tokens]
    return rewards
