from __future__ import annotations

import torch

from halos.losses import register_loss
from halos.losses.base import AlignmentLoss, LossOutput, PairedLogps, preference_metrics


@register_loss("slic")
class SLiCLoss(AlignmentLoss):
    """SLiC-HF (Zhao et al., 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", https://arxiv.org/abs/2305.10425), Eq. 1 with the chosen response as target:

        L = max(0, δ - log π(y_w|x) + log π(y_l|x)) - λ log π(y_w|x)

    Reference-free, on summed sequence log-probs; both terms are per sequence (HALOs' version
    broadcast a token-level NLL here). `delta` is δ (HALOs calls it `beta`), `lambda_coef` is λ.

    Reference implementation: HALOs' `SLiCTrainer.loss`,
    https://github.com/ContextualAI/HALOs/blob/4831988636b4cbc1c30c0bce78df568cf0f8103b/train/trainers.py#L824-L848
    """

    batch_kind = "paired"
    needs_reference = False

    def __init__(self, delta: float = 1.0, lambda_coef: float = 0.1) -> None:
        super().__init__()
        if delta < 0 or lambda_coef < 0:
            raise ValueError(f"{self.name}: delta and lambda_coef must be >= 0, "
                             f"got {delta} and {lambda_coef}")
        self.delta = delta
        self.lambda_coef = lambda_coef

    def loss(self, policy: PairedLogps, reference: None = None) -> LossOutput:
        calibration = torch.clamp(self.delta - (policy.chosen - policy.rejected), min=0)
        nll = -policy.chosen
        metrics = preference_metrics(policy.chosen, policy.rejected, policy)
        metrics["calibration"] = calibration.detach()
        metrics["nll"] = nll.detach()
        return LossOutput(losses=calibration + self.lambda_coef * nll, metrics=metrics)
