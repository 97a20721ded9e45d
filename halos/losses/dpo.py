"""DPO and the losses that only change how the reference-relative margin is penalised.

All four use the log-ratio margin h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
and differ in `margin_loss(h)`; the rest (metrics, the optional RPO term) is shared.
"""

from __future__ import annotations

import torch

from halos.losses import register_loss
from halos.losses.base import AlignmentLoss, LossOutput, PairedLogps, preference_metrics
from halos.losses.functional import reference_logratios, sequence_nll, smoothed_sigmoid_loss


@register_loss("dpo")
class DPOLoss(AlignmentLoss):
    """Direct Preference Optimization (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290).

    Eq. 7: L = -log σ(β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))]),
    with summed log-probs. `rpo_alpha` adds α × the length-normalised NLL of the chosen response
    (Pang et al., 2024, https://arxiv.org/abs/2404.19733, Eq. 4); off by default. That is the
    `rpo_alpha` of the TRL commit linked below; TRL 1.16 removed the option: there the same
    objective is `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, α]`, whose SFT term is
    the token mean over the batch's chosen responses (here: the mean over pairs of each chosen
    response's own token mean; the two agree when the responses have equal lengths).

    Reference implementation: TRL's `dpo_loss`, loss_type="sigmoid" (`rpo_alpha`: L1815-L1816),
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/trainer/dpo_trainer.py#L1130-L1156
    """

    batch_kind = "paired"
    needs_reference = True

    def __init__(self, beta: float = 0.1, rpo_alpha: float | None = None) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"{self.name}: beta must be > 0, got {beta}")
        self.beta = beta
        self.rpo_alpha = rpo_alpha

    def margin_loss(self, margin: torch.Tensor) -> torch.Tensor:
        """The per-pair loss of the log-ratio margin h (B,)."""
        return smoothed_sigmoid_loss(self.beta * margin)

    def loss(self, policy: PairedLogps, reference: PairedLogps) -> LossOutput:
        chosen_logratios, rejected_logratios = reference_logratios(policy, reference)
        losses = self.margin_loss(chosen_logratios - rejected_logratios)
        metrics = preference_metrics(self.beta * chosen_logratios, self.beta * rejected_logratios,
                                     policy)
        if self.rpo_alpha is not None:
            nll = sequence_nll(policy.chosen, policy.chosen_tokens, self.average_logps)
            losses = losses + self.rpo_alpha * nll
            metrics["nll"] = nll.detach()
        return LossOutput(losses=losses, metrics=metrics)


@register_loss("cdpo")
class ConservativeDPOLoss(DPOLoss):
    """Conservative DPO (Mitchell, 2023, "A note on DPO with noisy preferences & relationship to
    IPO", https://ericmitchell.ai/cdpo.pdf): DPO with preference labels flipped w.p. ε.

    L = -(1 - ε) log σ(β h) - ε log σ(-β h), h the DPO log-ratio margin (Rafailov et al., Eq. 7).
    This is HALOs' cDPO (ε = 0.2 there too) and loss_type="sigmoid" with `label_smoothing` ε in
    the TRL commit linked below. TRL 1.16's "sigmoid" ignores `label_smoothing`, and none of its
    loss types equals cDPO: "robust" is the de-biased rDPO (`robust` here), "aot" smooths the
    same way but pairs sorted margins, "exo_pair" is a KL to the smoothed labels.

    Reference implementation: TRL's `dpo_loss`, loss_type="sigmoid" with `label_smoothing`,
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/trainer/dpo_trainer.py#L1149-L1156
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.2,
                 rpo_alpha: float | None = None) -> None:
        super().__init__(beta=beta, rpo_alpha=rpo_alpha)
        if not 0 <= label_smoothing <= 0.5:
            raise ValueError(f"{self.name}: label_smoothing must be in [0, 0.5], got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def margin_loss(self, margin: torch.Tensor) -> torch.Tensor:
        return smoothed_sigmoid_loss(self.beta * margin, self.label_smoothing)


@register_loss("robust")
class RobustDPOLoss(DPOLoss):
    """Robust DPO, rDPO (Chowdhury et al., 2024, "Provably Robust DPO", https://arxiv.org/abs/2403.00409).

    The de-biased loss of Sec. 3 for labels flipped w.p. ε < 1/2:
    L = [(1 - ε) ℓ(h) - ε ℓ(-h)] / (1 - 2ε), ℓ(h) = -log σ(β h), h the DPO log-ratio margin.
    Its expectation under the noisy labels equals the clean DPO loss. TRL's loss_type="robust".

    Reference implementation: TRL's `dpo_loss`, loss_type="robust",
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/trainer/dpo_trainer.py#L1158-L1162
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.2,
                 rpo_alpha: float | None = None) -> None:
        super().__init__(beta=beta, rpo_alpha=rpo_alpha)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"{self.name}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def margin_loss(self, margin: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        forward = smoothed_sigmoid_loss(self.beta * margin)
        flipped = smoothed_sigmoid_loss(-self.beta * margin)
        return ((1 - eps) * forward - eps * flipped) / (1 - 2 * eps)


@register_loss("ipo")
class IPOLoss(DPOLoss):
    """Identity Preference Optimisation, IPO (Azar et al., 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", https://arxiv.org/abs/2310.12036).

    Eq. 17: L = (h - 1/(2τ))², h the log-ratio margin computed from *length-normalised*
    log-likelihoods (`average_logps`), as in the authors' experiments: the DPO repo's summed version
    makes the regulariser depend on response length, and TRL fixed it ("[DPO] average_log_prob when
    loss is IPO", huggingface/trl#1265). τ also scales the reward metrics, as β does for DPO.

    Reference implementation: TRL's `dpo_loss`, loss_type="ipo" (length-normalised: L1717-L1718),
    https://github.com/huggingface/trl/blob/a68fb896f008f58a3d37abf11ae665357b7c679a/trl/trainer/dpo_trainer.py#L1177-L1179
    """

    average_logps = True

    def __init__(self, tau: float = 0.1) -> None:
        if tau <= 0:
            raise ValueError(f"{self.name}: tau must be > 0, got {tau}")
        super().__init__(beta=tau)
        self.tau = tau

    def margin_loss(self, margin: torch.Tensor) -> torch.Tensor:
        return (margin - 1 / (2 * self.tau)) ** 2
