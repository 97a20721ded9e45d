from __future__ import annotations

from halos.losses import register_loss
from halos.losses.base import AlignmentLoss, LossOutput, SFTLogps
from halos.losses.functional import token_mean_nll


@register_loss("sft")
class SFTLoss(AlignmentLoss):
    """Supervised fine-tuning: negative log-likelihood of the target responses.

    The mean is over tokens of the whole microbatch (not per sequence), as in standard causal-LM
    training: loss = -Σ_i Σ_t log p(y_it) / Σ_i |y_i|. Per-example values are scaled so that
    their mean is exactly that token mean.

    Reference implementation: HALOs' `SFTTrainer.get_batch_metrics`,
    https://github.com/ContextualAI/HALOs/blob/4831988636b4cbc1c30c0bce78df568cf0f8103b/train/trainers.py#L552-L581
    """

    batch_kind = "sft"
    needs_reference = False

    def __init__(self) -> None:
        super().__init__()

    def loss(self, policy: SFTLogps, reference: None = None) -> LossOutput:
        losses, nll = token_mean_nll(policy.completion, policy.tokens)
        return LossOutput(losses=losses, metrics={"nll": nll})
