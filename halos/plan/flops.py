"""FLOPs and time of a job (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
Sec. 2.1): a forward costs 2N FLOPs per token, forward + backward 6N; activation checkpointing
runs the forward twice (8N). Scoring (reference log-probs, evals, KL pairs) and generation
(sampling, online PPO rollouts) are forwards: 2N per token.
"""

from __future__ import annotations

from halos.plan.tokens import Tokens


def job_flops(params: int, tokens: Tokens, activation_checkpointing: bool = False) -> float:
    per_trained = 8 if activation_checkpointing else 6
    return float(per_trained * params * tokens.trained
                 + 2 * params * (tokens.scored + tokens.generated))


def wall_hours(flops: float, peak_flops: float, devices: int, mfu: float) -> float:
    """Hours on `devices` devices each reaching `mfu` of `peak_flops`."""
    return flops / (peak_flops * devices * mfu) / 3600
