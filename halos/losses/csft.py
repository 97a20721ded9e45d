from __future__ import annotations

from halos.losses import register_loss
from halos.losses.base import AlignmentLoss, LossOutput, UnpairedLogps
from halos.losses.functional import token_mean_nll

GOOD, BAD = "<|good|>", "<|bad|>"


@register_loss("csft")
class ConditionalSFTLoss(AlignmentLoss):
    """Conditional SFT: conditional training of Korbak et al., 2023 ("Pretraining Language Models
    with Human Preferences", https://arxiv.org/abs/2302.08582, Sec. 3), HALOs' CSFT.

    Every completion, desirable or not, is trained with the SFT token-mean NLL, conditioned on a
    control token appended to its prompt: `<|good|>` for desirable ones, `<|bad|>` otherwise. The
    trainer adds both tokens to the tokenizer; at sampling time `<|good|>` is appended to the prompt.

    Placement, a deliberate difference from HALOs: the token ends the prompt, so it is masked
    (conditioned on, never predicted), as in Korbak et al.'s conditional training, and a prompt
    at sampling time ends exactly as in training. HALOs instead starts the completion with the
    token, so its loss also trains the model to emit it and its sampler forces it as the first
    response token; the trained distribution after the token is the same in both, the token's
    own log-prob is not.

    Reference implementation: HALOs' `ConditionalSFTDataLoader` with `SFTTrainer`,
    https://github.com/ContextualAI/HALOs/blob/4831988636b4cbc1c30c0bce78df568cf0f8103b/train/dataloader.py#L345-L448
    """

    batch_kind = "unpaired"
    needs_reference = False
    extra_special_tokens = (GOOD, BAD)

    def __init__(self) -> None:
        super().__init__()

    def prompt_suffix(self, desirable: bool) -> str:
        return GOOD if desirable else BAD

    def loss(self, policy: UnpairedLogps, reference: None = None) -> LossOutput:
        losses, nll = token_mean_nll(policy.completion, policy.tokens)
        return LossOutput(losses=losses, metrics={"nll": nll})
