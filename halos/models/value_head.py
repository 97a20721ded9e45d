"""A scalar value head on a causal LM backbone: the reward model of the `rm` loss, scoring, and
the policy + critic of offline PPO (`PolicyValueModel`).

The backbone is the causal LM's decoder (`model.get_decoder()`); the head is one
`nn.Linear(hidden, 1)` read at the last response token of each sequence. The LM is saved as usual
(`save_pretrained`) and the head beside it as `value_head.safetensors`, with TRL's key names
(`v_head.summary.weight`, `v_head.summary.bias`) as ms-swift writes them, so
`trl.AutoModelForCausalLMWithValueHead` loads the same folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from halos.files import atomic_file
from halos.models import VALUE_HEAD_FILE
from halos.train.logps import backbone_hidden, output_head, token_logps_from_hidden
from halos.train.packing import Packed

WEIGHT_KEY, BIAS_KEY = "v_head.summary.weight", "v_head.summary.bias"

Prompt = str | list[dict]  # plain text, or chat messages rendered with the tokenizer's template
Encoder = Callable[[Prompt, str], tuple[list[int], list[int]]]  # -> (prompt_ids, response_ids)


def new_value_head(hidden_size: int) -> nn.Linear:
    """Linear(hidden, 1) with N(0, 1/(hidden+1)) weights and a zero bias (TRL's `normal` init)."""
    head = nn.Linear(hidden_size, 1)
    nn.init.normal_(head.weight, std=1 / math.sqrt(hidden_size + 1))
    nn.init.zeros_(head.bias)
    return head


def last_scored_position(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) index of the last position where `loss_mask` (N, T) is set; for a row with no scored
    token, the last attended position (the end of the prompt)."""
    positions = torch.arange(loss_mask.shape[1], device=loss_mask.device)  # (T,)
    last_scored = torch.where(loss_mask.bool(), positions, -1).amax(dim=1)  # (N,)
    last_attended = torch.where(attention_mask.bool(), positions, 0).amax(dim=1)  # (N,)
    return torch.where(last_scored >= 0, last_scored, last_attended)


class ValueHeadModel(nn.Module):
    """A causal LM's decoder plus a scalar head. `forward` returns one score per sequence.

    The LM head is not used; unless it is tied to the input embeddings it is frozen, so that the
    optimizer (and ZeRO) carry no state for a parameter that never gets a gradient.
    """

    uses_lm_head = False  # a subclass that scores tokens too trains the LM head

    def __init__(self, causal_lm: nn.Module, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.model = causal_lm
        hidden_size = causal_lm.config.hidden_size
        self.value_head = head if head is not None else new_value_head(hidden_size)
        if self.value_head.in_features != hidden_size or self.value_head.out_features != 1:
            raise ValueError(f"value head is Linear({self.value_head.in_features}, "
                             f"{self.value_head.out_features}); the model needs Linear({hidden_size}, 1)")
        lm_head, embeddings = causal_lm.get_output_embeddings(), causal_lm.get_input_embeddings()
        if (not self.uses_lm_head and lm_head is not None
                and lm_head.weight is not embeddings.weight):
            lm_head.weight.requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor, packed: Packed | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (N,) float32 read at the last scored token, and scored-token counts (N,).

        Counts follow `halos.train.logps`: token t is scored when loss_mask[t] is set and t > 0.
        """
        hidden = backbone_hidden(self.model, input_ids, attention_mask, packed)  # (N, T, H)
        last = last_scored_position(loss_mask, attention_mask)  # (N,)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
        scores = self.value_head(picked.to(self.value_head.weight.dtype)).squeeze(-1)
        return scores.float(), loss_mask[:, 1:].sum(-1)

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values V_t (N, T-1) float32 on the grid of `halos.ops.token_logps_from_hidden`: the
        value of the state whose next token is input_ids[:, t+1] (PPO's critic)."""
        return self._grid_values(backbone_hidden(self.model, input_ids, attention_mask))

    def _grid_values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden[:, :-1].to(self.value_head.weight.dtype)).squeeze(-1).float()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs) -> None:
        """The LM's `save_pretrained` folder plus `value_head.safetensors`. `state_dict` is this
        module's (e.g. consolidated from ZeRO-3); the LM gets its `model.*` part."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        lm_state = {k.removeprefix("model."): v for k, v in state_dict.items()
                    if k.startswith("model.")}
        self.model.save_pretrained(folder, state_dict=lm_state, **kwargs)
        _write_head(state_dict["value_head.weight"], state_dict["value_head.bias"], folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **model_kwargs) -> ValueHeadModel:
        """Load the LM with `AutoModelForCausalLM` and its trained head (a new one if absent)."""
        from transformers import AutoModelForCausalLM

        causal_lm = AutoModelForCausalLM.from_pretrained(folder, **model_kwargs)
        head = load_value_head(folder) if (Path(folder) / VALUE_HEAD_FILE).is_file() else None
        if head is not None:
            head = head.to(dtype=next(causal_lm.parameters()).dtype)
        return cls(causal_lm, head)


class PolicyValueModel(ValueHeadModel):
    """A causal LM and a value head on its backbone, trained together (TRL's
    `AutoModelForCausalLMWithValueHead`, the policy of HALOs' PPO). One backbone pass gives both
    the per-token log-probs and the values V_t on the grid of `halos.ops.token_logps_from_hidden`.

    Saved like `ValueHeadModel`: an ordinary causal-LM folder (sampling and evaluation load it with
    `AutoModelForCausalLM`) plus `value_head.safetensors`.
    """

    uses_lm_head = True

    def __init__(self, causal_lm: nn.Module, head: nn.Linear | None = None,
                 chunk_size: int = 1024) -> None:
        super().__init__(causal_lm, head)
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor, packed: Packed | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs, mask, values), each (N, T-1); log-probs and values are float32."""
        hidden = backbone_hidden(self.model, input_ids, attention_mask, packed)  # (N, T, H)
        logps, mask = token_logps_from_hidden(hidden, input_ids, loss_mask,
                                              output_head(self.model), self.chunk_size)
        return logps, mask, self._grid_values(hidden)


def save_value_head(head: nn.Linear, folder: str | Path) -> Path:
    """Write `folder/value_head.safetensors` atomically (float32); return its path.

    Under ZeRO-3 the caller gathers the head's parameters first (it is a plain nn.Linear).
    """
    return _write_head(head.weight, head.bias, folder)


def _write_head(weight: torch.Tensor, bias: torch.Tensor, folder: str | Path) -> Path:
    path = Path(folder) / VALUE_HEAD_FILE
    tensors = {WEIGHT_KEY: weight.detach().float().cpu().contiguous(),
               BIAS_KEY: bias.detach().float().cpu().contiguous()}
    with atomic_file(path, "wb") as handle:
        handle.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
    return path


def load_value_head(folder: str | Path) -> nn.Linear:
    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no value head; is {folder} a reward model trained with "
                                f"loss `rm`?")
    tensors = load_file(str(path))
    if WEIGHT_KEY not in tensors or BIAS_KEY not in tensors:
        raise ValueError(f"{path}: expected tensors {WEIGHT_KEY!r} and {BIAS_KEY!r}, "
                         f"found {sorted(tensors)}")
    weight, bias = tensors[WEIGHT_KEY], tensors[BIAS_KEY]
    if weight.dim() != 2 or weight.shape[0] != 1 or bias.shape != (1,):
        raise ValueError(f"{path}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} is not "
                         f"a (1, hidden) scalar head")
    head = nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def plain_encoder(tokenizer) -> Encoder:
    """(prompt, response) -> token ids: chat messages through the tokenizer's chat template with
    the generation prompt, text as is; the response is followed by the EOS token."""

    def encode(prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
        if isinstance(prompt, str):
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        else:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        return prompt_ids, response_ids

    return encode


@torch.no_grad()
def score_texts(model_dir: str | Path, prompts: Sequence[Prompt], responses: Sequence[str],
                tokenizer=None, *, encode: Encoder | None = None, batch_size: int = 8,
                max_length: int | None = None, device: str | torch.device | None = None,
                model: ValueHeadModel | None = None) -> list[float]:
    """Reward-model scores of (prompt, response) pairs, one float each, in input order.

    `encode` must tokenize the way training did (pass the data pipeline's function); the default
    is `plain_encoder(tokenizer)`. Over `max_length` tokens, the prompt is cut from the left, then
    the response from the right. `model` skips loading (tests, or scoring several lists).
    """
    from halos.train.batching import collate

    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encode = encode or plain_encoder(tokenizer)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = (model or ValueHeadModel.from_pretrained(model_dir)).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = [_truncate(*encode(p, r), max_length)
                 for p, r in zip(prompts, responses, strict=True)]
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch = collate(chunk, pad_id, "sft", len(chunk))
        out, _ = model(batch.input_ids.to(device), batch.attention_mask.to(device),
                       batch.loss_mask.to(device))
        scores += out.tolist()
    return scores


def _truncate(prompt_ids: list[int], response_ids: list[int],
              max_length: int | None) -> tuple[list[int], list[int]]:
    if max_length is None or len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    keep_prompt = max(max_length - len(response_ids), 1)
    prompt_ids = prompt_ids[-keep_prompt:]
    return prompt_ids, response_ids[: max_length - len(prompt_ids)]
