"""Generation, shared by `halos sample` (evaluation) and online PPO's rollouts (training).

Prompts are rendered exactly as training rendered them (`halos.data.tokenize`, the run's chat
template and truncation) plus the loss's sampling suffix (CSFT's `<|good|>`). Batches are
left-padded; generation stops at EOS. `generate` runs batch b under
`torch.manual_seed(seed * SEED_STRIDE + b)`, so a rerun with the same options gives identical
completions (temperature samples also depend on the batch size; greedy decoding does not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SEED_STRIDE = 1_000_003  # batch b samples under torch.manual_seed(seed * SEED_STRIDE + b)


@dataclass(frozen=True)
class PromptFormat:
    """How a run renders a prompt: its truncation, chat template and sampling suffix."""

    max_length: int = 512
    max_prompt_length: int = 256
    chat_template: str | None = None  # None: the tokenizer's own
    suffix: str = ""


def encode_prompts(prompts: list[list[dict]], tokenizer, fmt: PromptFormat) -> list[list[int]]:
    """Token ids of each prompt with the generation prompt, as training tokenized it, plus the
    sampling suffix."""
    from halos.data.tokenize import tokenize_unpaired

    rows = [{"id": str(i), "prompt": p, "label": "desirable",
             "completion": [{"role": "assistant", "content": "x"}]} for i, p in enumerate(prompts)]
    examples, _ = tokenize_unpaired(rows, tokenizer, max_length=fmt.max_length,
                                    max_prompt_length=fmt.max_prompt_length,
                                    chat_template=fmt.chat_template)
    suffix_ids = tokenizer.encode(fmt.suffix, add_special_tokens=False) if fmt.suffix else []
    return [list(e.prompt_ids) + suffix_ids for e in examples]


def generate_ids(model, prompt_ids: list[list[int]], *, eos: int, pad: int, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0, device, synced_gpus: bool = False
                 ) -> list[list[int]]:
    """One left-padded batch through `model.generate`: each completion's token ids, up to and
    including its first EOS (all of them when it has none). The caller seeds the sampling.
    `synced_gpus` keeps ZeRO-3 processes generating in step until every one has finished."""
    import torch

    width = max(map(len, prompt_ids))
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
        if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                 "top_k": None}
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids.to(device),
                                   attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, eos_token_id=eos,
                                   pad_token_id=pad, synced_gpus=synced_gpus, **options)
    out = []
    for row in generated[:, width:].tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def generate(model, tokenizer, prompt_ids: list[list[int]], *, temperature: float, top_p: float,
             max_new_tokens: int, seed: int, batch_size: int, device,
             on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    """Left-padded batched generation; returns the decoded completions (special tokens and
    surrounding whitespace removed, cut at the first EOS). `on_batch(done, total)` is called
    after each batch (progress lines)."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = []
    for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
        torch.manual_seed(seed * SEED_STRIDE + b)
        for row in generate_ids(model, prompt_ids[start : start + batch_size], eos=eos, pad=pad,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, device=device):
            row = row[:-1] if row and row[-1] == eos else row
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        if on_batch is not None:
            on_batch(b + 1, -(-len(prompt_ids) // batch_size))
    return out
