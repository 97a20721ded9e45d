from __future__ import annotations

import torch.nn.functional as F

from halos.losses import register_loss
from halos.losses.base import AlignmentLoss, LossOutput, PairedLogps


@register_loss("rm")
class RewardModelLoss(AlignmentLoss):
    """Bradley-Terry reward model (Ouyang et al., 2022, https://arxiv.org/abs/2203.02155, Eq. 1).

    L = -log σ(r(x, y_w) - r(x, y_l)), with r the scalar a value head reads at the last response
    token (`halos.models.value_head.ValueHeadModel`); the trainer puts r into `PairedLogps.chosen` and
    `.rejected`. The head is saved as `value_head.safetensors` beside the model (ms-swift's layout).

    Reference implementation: TRL's `RewardTrainer.compute_loss`,
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/trainer/reward_trainer.py#L624-L631
    """

    batch_kind = "paired"
    needs_reference = False
    model_head = "value_head"

    def __init__(self) -> None:
        super().__init__()

    def loss(self, policy: PairedLogps, reference: None = None) -> LossOutput:
        margin = policy.chosen - policy.rejected
        metrics = {
            "rewards/chosen": policy.chosen.detach(),
            "rewards/rejected": policy.rejected.detach(),
            "rewards/accuracy": (margin > 0).float().detach(),
            "rewards/margin": margin.detach(),
        }
        return LossOutput(losses=-F.logsigmoid(margin), metrics=metrics)
