"""Archangel's offline PPO: one PPO step on logged completions, no generation."""

from __future__ import annotations

import torch

from halos.losses import register_loss
from halos.losses.base import AlignmentLoss, LossOutput, TokenLogps, label_sums
from halos.rl import ppo_math as rl


@register_loss("ppo")
class OfflinePPOLoss(AlignmentLoss):
    """Offline PPO, the HALOs/Archangel variant (Ethayarajh et al., 2024, "KTO: Model Alignment
    as Prospect Theoretic Optimization", https://arxiv.org/abs/2402.01306; HALOs' `PPOTrainer`
    and `config/loss/ppo.yaml`): a one-step PPO update on the (prompt, completion, label) data,
    with a dummy reward of +1 (desirable) or −1 (undesirable) on the last completion token.

    With PPO (Schulman et al., 2017, https://arxiv.org/abs/1707.06347) and GAE (Schulman et al.,
    2016, https://arxiv.org/abs/1506.02438), per response token t:
      δ_t = r_t + γ V(s_{t+1}) − V(s_t)                      (PPO Eq. 12; V past the end = 0)
      Â_t = Σ_l (γλ)^l δ_{t+l}, whitened over the batch       (PPO Eq. 11, GAE Eq. 16)
      ρ_t = π(a_t|s_t) / π_old(a_t|s_t),  π_old = the reference (the data's policy)
      L^CLIP = −min(ρ_t Â_t, clip(ρ_t, 1 − ε, 1 + ε) Â_t)    (PPO Eq. 7, as a loss)
      L^VF = ½ (V(s_t) − R_t)², R_t = Â_t + V_old(s_t)      (the value term of PPO Eq. 9,
                                                              clipped around V_old as in PPO2)
      L = mean_t [L^CLIP + critic_coef · L^VF + kl_coef · (log π_ref − log π)]
    averaged over the batch's response tokens (HALOs' masked mean). V is a scalar head on the
    policy's backbone; V_old is its detached output (one step: the value clip never binds).

    Names and defaults are HALOs' (`KL_coef` there; HALOs at the commit linked below), with two
    differences. The clip is the PPO paper's [1 − ε, 1 + ε]; HALOs clips to [ε, 1/ε], which has
    the same lower end at its ε = 0.5. The critic regresses on the GAE returns R_t (PPO, TRL);
    HALOs' target sums only the rewards after token t, so it is 0 at the last token that carries
    the reward. HALOs' `ppo_epochs` (default 1) has no counterpart: each batch gets one gradient
    step. The advantages are whitened with the unbiased variance (n − 1 over the batch's n
    response tokens, TRL's `masked_whiten`, shared with online PPO); HALOs' `masked_var` ignores
    its `unbiased` flag and divides by n, so its advantages are √((n − 1)/n) times these: a
    uniform rescaling of the policy loss by under 0.1% once a batch holds 500 response tokens.

    Metrics have TRL's names (loss/policy, loss/value, policy/clipfrac, policy/approxkl,
    val/clipfrac, objective/kl = Σ_t log π − log π_ref, ...) plus the mean summed log-ratio of
    each label (logratio/desirable, logratio/undesirable).

    Reference implementation: HALOs' `PPOTrainer.compute_advantages` and `.loss` (HALOs' main
    since 4831988 clips to [1 − ε, 1 + ε], adds r_t to the critic target, negates the KL term),
    https://github.com/ContextualAI/HALOs/blob/5d8a5e4b86782b3b8e8bdcedcd053f8a02f97592/train/trainers.py#L952-L1032
    """

    batch_kind = "unpaired"
    needs_reference = True
    token_level = True
    model_head = "causal_lm_value_head"

    def __init__(self, cliprange: float = 0.5, gamma: float = 0.99, lam: float = 0.95,
                 critic_coef: float = 0.01, kl_coef: float = 0.1) -> None:
        super().__init__()
        if not 0 < cliprange < 1:
            raise ValueError(f"{self.name}: cliprange must be in (0, 1), got {cliprange}")
        for key, value in (("gamma", gamma), ("lam", lam)):
            if not 0 <= value <= 1:
                raise ValueError(f"{self.name}: {key} must be in [0, 1], got {value}")
        if critic_coef < 0 or kl_coef < 0:
            raise ValueError(f"{self.name}: critic_coef and kl_coef must be >= 0, "
                             f"got {critic_coef} and {kl_coef}")
        self.cliprange, self.gamma, self.lam = cliprange, gamma, lam
        self.critic_coef, self.kl_coef = critic_coef, kl_coef

    def loss(self, policy: TokenLogps, reference: TokenLogps) -> LossOutput:
        if policy.values is None or policy.desirable is None:
            raise ValueError(f"{self.name}: needs the value head's values and the labels "
                             f"(TokenLogps.values, TokenLogps.desirable)")
        mask, values = policy.mask, policy.values
        advantages, returns = self.advantages(policy.desirable, values.detach(), mask)
        pg = rl.clipped_policy_loss(policy.logps, reference.logps, advantages, mask,
                                    self.cliprange)
        # One offline step: V_old = V, so the value clip never binds (HALOs' critic is unclipped).
        vf = rl.clipped_value_loss(values, values.detach(), returns, mask, self.cliprange)
        log_ratio = (policy.logps - reference.logps) * mask
        penalty = -rl.masked_mean(log_ratio, mask, dim=1)  # HALOs' KL term: log π_ref − log π
        per_sequence = (pg.per_sequence + self.critic_coef * vf.per_sequence
                        + self.kl_coef * penalty)
        metrics = _metrics(pg, vf, log_ratio, values, returns, mask, policy.desirable.bool())
        return LossOutput(losses=per_sequence * token_weights(mask), metrics=metrics)

    @torch.no_grad()
    def advantages(self, desirable: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whitened GAE advantages and returns (B, T-1) of the ±1 last-token rewards."""
        scores = torch.where(desirable.to(mask.device).bool(), 1.0, -1.0).to(values.dtype)
        rewards = rl.last_token_rewards(scores, mask)
        advantages, returns = rl.gae(rewards, values, mask, self.gamma, self.lam)
        return rl.masked_whiten(advantages, mask), returns


def token_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B,) weights w_b = B · n_b / Σ n: the mean over b of w_b · (per-sequence token mean) is
    the token mean over the batch, so the trainer's mean of `losses` is the batch's token mean."""
    counts = mask.sum(-1).to(torch.float32)
    return counts * mask.shape[0] / counts.sum().clamp(min=1)


def _metrics(pg: rl.PolicyLoss, vf: rl.ValueLoss, log_ratio: torch.Tensor, values: torch.Tensor,
             returns: torch.Tensor, mask: torch.Tensor,
             desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    sequence_log_ratio = log_ratio.detach().sum(-1)
    return {
        "loss/policy": pg.loss.detach(), "loss/value": vf.loss.detach(),
        "loss/kl": -rl.masked_mean(log_ratio.detach(), mask),
        "policy/clipfrac": pg.clipfrac, "policy/approxkl": pg.approxkl,
        "policy/ratio": rl.masked_mean(pg.ratio, mask), "val/clipfrac": vf.clipfrac,
        "val/vpred": rl.masked_mean(values.detach(), mask),
        "returns/mean": rl.masked_mean(returns, mask),
        "objective/kl": sequence_log_ratio,  # TRL's: Σ_t log π − log π_ref per sequence
        **label_sums(sequence_log_ratio, desirable, "logratio"),
    }
