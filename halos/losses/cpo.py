"""Reference-free preference losses with an NLL term on the chosen response: CPO, SimPO, ORPO.

The NLL term is per sequence and length-normalised, −log π(y_w|x)/|y_w| (exactly ORPO's L_SFT;
CPO and SimPO implementations use a token mean, which weights long responses more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from halos.losses import register_loss
from halos.losses.base import AlignmentLoss, LossOutput, PairedLogps, preference_metrics
from halos.losses.functional import log1mexp, sequence_nll

# ORPO: an average log-prob of exactly 0 (p = 1, easy to hit in float32) has infinite odds.
MAX_AVERAGE_LOGP = -1e-6


@register_loss("cpo")
class CPOLoss(AlignmentLoss):
    """Contrastive Preference Optimization (Xu et al., 2024, https://arxiv.org/abs/2401.08417).

    L = L_prefer + α L_NLL with L_prefer = -log σ(β log π(y_w|x) - β log π(y_l|x)) (the DPO loss
    with a uniform reference, summed log-probs) and L_NLL = -log π(y_w|x) (length-normalised here).
    Hyperparameter names and defaults are ms-swift's / TRL's (`beta`, `cpo_alpha`).

    Reference implementation: TRL's `CPOTrainer.cpo_loss`, loss_type="sigmoid" (α·NLL term: L844),
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/experimental/cpo/cpo_trainer.py#L632-L703
    """

    batch_kind = "paired"
    needs_reference = False

    def __init__(self, beta: float = 0.1, cpo_alpha: float = 1.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"{self.name}: beta must be > 0, got {beta}")
        if cpo_alpha < 0:
            raise ValueError(f"{self.name}: cpo_alpha must be >= 0, got {cpo_alpha}")
        self.beta = beta
        self.cpo_alpha = cpo_alpha
        self.gamma = 0.0  # SimPO's target reward margin

    def loss(self, policy: PairedLogps, reference: None = None) -> LossOutput:
        chosen_rewards, rejected_rewards = self.beta * policy.chosen, self.beta * policy.rejected
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma)
        metrics = preference_metrics(chosen_rewards, rejected_rewards, policy)
        nll = sequence_nll(policy.chosen, policy.chosen_tokens, self.average_logps)
        metrics["nll"] = nll.detach()
        if self.cpo_alpha:
            losses = losses + self.cpo_alpha * nll
        return LossOutput(losses=losses, metrics=metrics)


@register_loss("simpo")
class SimPOLoss(CPOLoss):
    """Simple Preference Optimization (Meng et al., 2024, https://arxiv.org/abs/2405.14734).

    Eq. 6: L = -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ), on length-averaged
    log-probs, plus ms-swift's / TRL's CPO NLL term α L_NLL for stability; `cpo_alpha=0` gives the
    original SimPO. Names and defaults are ms-swift's: `beta` 2.0, `simpo_gamma` (γ) 1.0.

    Reference implementation: TRL's `CPOTrainer.cpo_loss`, loss_type="simpo" (averaged: L804),
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/experimental/cpo/cpo_trainer.py#L669-L676
    """

    average_logps = True

    def __init__(self, beta: float = 2.0, simpo_gamma: float = 1.0, cpo_alpha: float = 1.0) -> None:
        super().__init__(beta=beta, cpo_alpha=cpo_alpha)
        self.simpo_gamma = simpo_gamma
        self.gamma = simpo_gamma


def log_odds(average_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) with log P the length-averaged log-prob, as ORPO defines P."""
    average_logps = average_logps.clamp(max=MAX_AVERAGE_LOGP)
    return average_logps - log1mexp(average_logps)


@register_loss("orpo")
class ORPOLoss(AlignmentLoss):
    """Odds Ratio Preference Optimization (Hong et al., 2024, https://arxiv.org/abs/2403.07691).

    Eq. 6: L = L_SFT + λ L_OR, with L_SFT the length-normalised NLL of y_w and
    Eq. 7: L_OR = -log σ(log odds(y_w|x) - log odds(y_l|x)), odds(y|x) = P(y|x) / (1 - P(y|x)),
    where P(y|x) = exp(mean_t log π(y_t|x, y_<t)) is the length-normalised likelihood (hence
    `average_logps`). As in ms-swift and TRL, λ is passed as `beta` (default 0.1, TRL's).

    Reference implementation: TRL's `ORPOTrainer.odds_ratio_loss` (full loss: L805),
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/experimental/orpo/orpo_trainer.py#L647-L659
    """

    batch_kind = "paired"
    needs_reference = False
    average_logps = True

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"{self.name}: beta (ORPO's lambda) must be >= 0, got {beta}")
        self.beta = beta

    def loss(self, policy: PairedLogps, reference: None = None) -> LossOutput:
        log_odds_ratio = log_odds(policy.chosen) - log_odds(policy.rejected)
        odds_ratio_loss = -F.logsigmoid(log_odds_ratio)
        nll = sequence_nll(policy.chosen, policy.chosen_tokens, self.average_logps)
        metrics = preference_metrics(self.beta * policy.chosen, self.beta * policy.rejected, policy)
        metrics.update({"nll": nll.detach(), "log_odds_ratio": log_odds_ratio.detach(),
                        "odds_ratio_loss": odds_ratio_loss.detach()})
        return LossOutput(losses=nll + self.beta * odds_ratio_loss, metrics=metrics)
