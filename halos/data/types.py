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
