from __future__ import annotations

from collections.abc import Mapping

import torch

from halos.losses import register_loss
from halos.losses.base import AlignmentLoss, LossOutput, UnpairedLogps, label_sums
from halos.losses.functional import mean_over_ranks

RECOMMENDED_WEIGHT_RATIO = (1.0, 4.0 / 3.0)  # λD·nD / (λU·nU), as the KTO paper and ms-swift recommend


@register_loss("kto")
class KTOLoss(AlignmentLoss):
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024, https://arxiv.org/abs/2402.01306).

    Eq. 8, per example with r = log π(y|x) - log π_ref(y|x) (summed log-probs):
        desirable:   λD (1 - σ(β (r - z)))
        undesirable: λU (1 - σ(β (z - r)))
    The reference point z = max(0, mean_j [log π(y_j|x_i) - log π_ref(y_j|x_i)]) is estimated
    from the mismatched pairs the trainer scores (`UnpairedLogps.kl`), without gradient, averaged
    over data-parallel ranks before clamping (as TRL does). Names and defaults are ms-swift's.

    Reference implementation: TRL's `KTOTrainer.kto_loss`, loss_type="kto",
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/experimental/kto/kto_trainer.py#L1013-L1056
    """

    batch_kind = "unpaired"
    needs_reference = True
    needs_kl_pairs = True

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"{self.name}: beta must be > 0, got {beta}")
        if desirable_weight <= 0 or undesirable_weight <= 0:
            raise ValueError(f"{self.name}: desirable_weight and undesirable_weight must be > 0, "
                             f"got {desirable_weight} and {undesirable_weight}")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    @staticmethod
    def check_weights(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> str | None:
        """A warning if λD·nD / (λU·nU) is outside the recommended [1, 4/3], else None."""
        low, high = RECOMMENDED_WEIGHT_RATIO
        if n_desirable == 0 or n_undesirable == 0:
            kind = "desirable" if n_desirable == 0 else "undesirable"
            return (f"kto: the training data has no {kind} examples; KTO needs both kinds "
                    f"(nD={n_desirable}, nU={n_undesirable})")
        ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
        if low <= ratio <= high:
            return None
        target = low if ratio < low else high  # the nearest end of the range
        suggest_d = undesirable_weight * n_undesirable * target / n_desirable
        suggest_u = desirable_weight * n_desirable / (n_undesirable * target)
        return (f"kto: desirable_weight·nD / (undesirable_weight·nU) = {desirable_weight}·"
                f"{n_desirable} / ({undesirable_weight}·{n_undesirable}) = {ratio:.3g} is outside "
                f"the recommended [1, 4/3]; e.g. set desirable_weight={suggest_d:.3g} or "
                f"undesirable_weight={suggest_u:.3g}")

    def dataset_warnings(self, counts: Mapping[str, int]) -> list[str]:
        """`AlignmentLoss.dataset_warnings` for KTO: `counts` has "desirable" and "undesirable"
        example counts; warns if the weighted ratio is outside the recommended range."""
        message = self.check_weights(counts.get("desirable", 0), counts.get("undesirable", 0),
                                     self.desirable_weight, self.undesirable_weight)
        return [message] if message else []

    def loss(self, policy: UnpairedLogps, reference: UnpairedLogps) -> LossOutput:
        if policy.kl is None or reference.kl is None:
            raise ValueError(f"{self.name}: needs log-probs of mismatched pairs (UnpairedLogps.kl) "
                             f"from the policy and the reference")
        z = kl_reference_point(policy.kl, reference.kl)
        logratios = policy.completion - reference.completion  # (B,)
        desirable = policy.desirable.to(device=logratios.device, dtype=torch.bool)
        losses = torch.where(desirable,
                             self.desirable_weight * (1 - torch.sigmoid(self.beta * (logratios - z))),
                             self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z - logratios))))
        # Per-label sums and counts, not means: a microbatch may hold only one label.
        rewards = label_sums(self.beta * logratios, desirable, "rewards")
        return LossOutput(losses=losses, metrics={"kl": z, **rewards})


@torch.no_grad()
def kl_reference_point(policy_kl: torch.Tensor, reference_kl: torch.Tensor) -> torch.Tensor:
    """KTO's z: the mean log-ratio of mismatched pairs over all ranks, clamped at 0, no gradient."""
    return mean_over_ranks((policy_kl - reference_kl).mean()).clamp(min=0)
