"""Token log-probabilities without materialising the B×T×V logits tensor.

A causal LM scores token t with the hidden state at t-1. Preference and SFT losses only use the
response tokens, so we gather the hidden states whose *next* token is scored (M of them, M ≪ B·T)
and apply the LM head to those alone, in chunks of `chunk_size` rows. When the scored positions
fill several chunks, each runs under activation checkpointing: only its (chunk, V) logits exist
at any moment, in the forward and in the recomputation during backward. A single chunk keeps its
logits for backward instead: they live no longer than the backbone's own saved activations, so
the step's peak is the same and the head's forward is not run twice. On a CPU the vocabulary
softmax dominates the cost of a step, so skipping prompt and padding positions is the main
speed-up, not a detail; and the softmax's backward is written by hand (`_TargetLogSoftmax`): it
turns the logits into their own gradient g·(onehot − softmax) in place, three passes over the
(chunk, V) tensor instead of the eight or so of autograd's logsumexp and gather backward with
their fresh temporaries.

Some architectures change the LM head's output before the softmax (Gemma-2's final logit
softcapping, Cohere's `logit_scale`, Granite's `logits_scaling`); `output_head` applies exactly
what the model's own forward applies, and refuses a model whose post-processing it does not know.
A bias of the LM head (e.g. Phi) is part of the head and needs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from halos.config import ConfigError
from halos.train.packing import Packed

# What a model type's forward does to `lm_head(hidden)`: multiply by / divide by / softcap with
# the named config field (see each model's `forward` in transformers).
_MULTIPLIED = {"cohere": "logit_scale", "cohere2": "logit_scale",
               "falcon_h1": "lm_head_multiplier"}
_DIVIDED = {t: "logits_scaling" for t in ("granite", "granitemoe", "granitemoeshared",
                                          "granitemoehybrid")}
_SOFTCAPPED = {t: "final_logit_softcapping" for t in ("gemma2", "gemma3", "gemma3_text")}
# Config fields that mean post-processed logits in some architecture; on another model type they
# are refused rather than guessed (the same name multiplies in one model and divides in another).
_POSTPROCESSING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                          "lm_head_multiplier", "output_multiplier")


@dataclass
class SequenceLogps:
    """Per-sequence log-probabilities of the scored tokens."""

    sums: torch.Tensor  # (N,) sum of log p(token) over scored tokens
    tokens: torch.Tensor  # (N,) number of scored tokens

    def averaged(self) -> torch.Tensor:
        return self.sums / self.tokens.clamp(min=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _TargetLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[target] per row, whose backward overwrites the saved logits z with
    d/dz = g·(onehot(target) − exp(z − lse)): nothing else reads them afterwards (the head's
    backward needs its inputs, not its output)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_normalizer = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, log_normalizer)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normalizer

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, log_normalizer = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_logits = logits.sub_(log_normalizer.unsqueeze(-1)).exp_().mul_(-grad)
        return grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad), None


def _target_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = _at_least_fp32(head(hidden))  # (chunk, V)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TargetLogSoftmax.apply(logits, targets)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class LogitHead(nn.Module):
    """The LM head followed by the model's own logit post-processing: logits × `scale`, then
    `softcap` · tanh(logits / `softcap`), in at least fp32."""

    def __init__(self, head: nn.Module, scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.head, self.scale, self.softcap = head, scale, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = _at_least_fp32(self.head(hidden))
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_postprocessing(config) -> tuple[float, float | None]:
    """(scale, softcap) that the forward of `config`'s architecture applies to its LM head's
    output; a post-processing field on an architecture not listed above is an error."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = getattr(config, "model_type", "")
    if kind in _MULTIPLIED:
        return float(getattr(config, _MULTIPLIED[kind])), None
    if kind in _DIVIDED:
        return 1.0 / float(getattr(config, _DIVIDED[kind])), None
    if kind in _SOFTCAPPED:
        return 1.0, getattr(config, _SOFTCAPPED[kind], None)
    for name in _POSTPROCESSING_FIELDS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ConfigError(
                f"model type {kind!r} sets {name} = {getattr(config, name)!r}, a logit "
                f"post-processing the log-prob kernel (halos/train/logps.py) does not know how "
                f"this architecture applies; supported: "
                f"{', '.join(sorted({*_MULTIPLIED, *_DIVIDED, *_SOFTCAPPED}))}")
    return 1.0, None


def output_head(causal_lm: nn.Module) -> nn.Module:
    """`causal_lm`'s LM head, wrapped in its logit post-processing when it has one."""
    head = causal_lm.get_output_embeddings()
    scale, softcap = logit_postprocessing(causal_lm.config)
    return head if scale == 1.0 and not softcap else LogitHead(head, scale, softcap)


def chunk_starts(rows: int, chunk_size: int, head: nn.Module) -> range:
    """Start rows of the chunks in which `head` is applied to `rows` rows.

    Under ZeRO-3 with several processes every call of `head` gathers its weight collectively,
    so all ranks must make the same number of calls: each runs as many chunks as the rank with
    the most scored tokens (the extra ones are empty).
    """
    if chunk_size < 1:
        raise ValueError(f"logits chunk size must be >= 1, got {chunk_size}")
    chunks = -(-rows // chunk_size)
    partitioned = any(hasattr(p, "ds_id") for p in head.parameters())
    if partitioned and dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([chunks], dtype=torch.int64, device=next(head.parameters()).device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        chunks = int(count)
    return range(0, chunks * chunk_size, chunk_size)


def chunked_target_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for each row of `hidden` (M, H), via `head` in chunks."""
    pieces = []
    starts = chunk_starts(hidden.shape[0], chunk_size, head)  # the same count on every rank
    recompute = len(starts) > 1
    for start in starts:
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad and recompute:
            pieces.append(checkpoint(_target_logps, h, t, head, use_reentrant=False))
        else:
            pieces.append(_target_logps(h, t, head))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def token_logps_from_hidden(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    head: nn.Module,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs on the (N, T-1) grid of next-token positions, and its boolean mask.

    grid[n, t] = log p(input_ids[n, t+1] | ≤ t) where loss_mask[n, t+1] is set, else 0; only
    those positions go through `head`. PPO uses the grid; sequence losses sum it.
    """
    scored = loss_mask[:, 1:].bool()  # (N, T-1): token t+1 is scored from position t
    picked_hidden = hidden[:, :-1][scored]  # (M, H)
    targets = input_ids[:, 1:][scored]  # (M,)
    token_logps = chunked_target_logps(picked_hidden, targets, head, chunk_size)  # (M,)
    grid = token_logps.new_zeros(scored.shape).masked_scatter(scored, token_logps)
    return grid, scored


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    head: nn.Module,
    chunk_size: int = 1024,
) -> SequenceLogps:
    """Sum the log-probs of tokens where `loss_mask` (N, T) is true, given hidden states (N, T, H)."""
    grid, scored = token_logps_from_hidden(hidden, input_ids, loss_mask, head, chunk_size)
    return SequenceLogps(sums=grid.sum(-1), tokens=scored.sum(-1))


def naive_sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                         loss_mask: torch.Tensor) -> SequenceLogps:
    """The textbook computation over full (N, T, V) logits; used to test the chunked path."""
    logps = F.log_softmax(_at_least_fp32(logits[:, :-1]), dim=-1)  # (N, T-1, V)
    picked = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    scored = loss_mask[:, 1:].to(picked.dtype)
    return SequenceLogps(sums=(picked * scored).sum(-1), tokens=loss_mask[:, 1:].sum(-1))


def backbone_hidden(causal_lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    packed: Packed | None = None) -> torch.Tensor:
    """The last hidden states (N, T, H) of a causal LM's decoder, without its LM head. With
    `packed`, the decoder runs over the packed rows and the states come back on the padded
    (N, T) layout of `input_ids`."""
    decoder = causal_lm.get_decoder()
    if packed is None:
        return decoder(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).last_hidden_state
    bias = packed.attention_bias(next(decoder.parameters()).dtype)
    hidden = decoder(input_ids=packed.input_ids, attention_mask=bias,
                     position_ids=packed.position_ids, use_cache=False).last_hidden_state
    return packed.unpack(hidden)


class CausalLMLogps(nn.Module):
    """Wrap a Hugging Face causal LM so that its forward returns per-sequence log-probs.

    DeepSpeed wraps this module, so every ZeRO-3 parameter hook runs as in an ordinary forward;
    the backbone runs once over the whole padded batch and the LM head only at scored positions.
    With `token_level` the forward returns the per-token grid and its mask instead (PPO).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, token_level: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.token_level = token_level
        logit_postprocessing(model.config)  # refuse an unknown one before any work

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor, packed: Packed | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums (N,), token counts (N,)), or with `token_level` (grid (N, T-1), mask (N, T-1))."""
        hidden = backbone_hidden(self.model, input_ids, attention_mask, packed)  # (N, T, H)
        args = (hidden, input_ids, loss_mask, output_head(self.model), self.chunk_size)
        if self.token_level:
            return token_logps_from_hidden(*args)
        out = sequence_logps_from_hidden(*args)
        return out.sums, out.tokens

    def save_pretrained(self, folder, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs) -> None:
        """The wrapped model's `save_pretrained`; `state_dict` is this module's (keys `model.*`)."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        inner = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.model.save_pretrained(folder, state_dict=inner, **kwargs)
