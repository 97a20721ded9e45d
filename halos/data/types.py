"""The tokenized shapes every trainer entry point consumes.

Normalized *text* rows (what `halos data prepare` writes as JSONL) are plain dicts:

- paired:   {"id", "source", "prompt": [messages], "chosen": [messages], "rejected": [messages]}
- unpaired: {"id", "source", "prompt": [messages], "completion": [messages], "label": "desirable"|"undesirable"}

where a message is {"role": "system"|"user"|"assistant", "content": str}. Tokenization turns them
into the dataclasses below. A sequence the model sees is always `prompt_ids + response_ids`; only
the response tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenizedPair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class TokenizedCompletion:
    id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool = True


TokenizedExample = TokenizedPair | TokenizedCompletion


def token_parts(example: TokenizedExample) -> tuple[list[int], ...]:
    """An example's token id lists in a fixed order: prompt, chosen, rejected or prompt,
    completion."""
    if isinstance(example, TokenizedPair):
        return example.prompt_ids, example.chosen_ids, example.rejected_ids
    return example.prompt_ids, example.completion_ids
