"""Paired rows to unpaired ones (for KTO-style losses and for SFT on chosen responses)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from halos.data.rows import unpaired_row

HALVES = ("chosen", "rejected")


def _half(row: dict, which: str) -> dict:
    label = "desirable" if which == "chosen" else "undesirable"
    return unpaired_row(row["source"], row["prompt"], row[which], label, id=f"{row['id']}/{which}")


def pair_of(unpaired_id: str) -> str | None:
    """The id of the pair `paired_to_unpaired` made this row from, or None for any other row."""
    pair, _, which = unpaired_id.rpartition("/")
    return pair if pair and which in HALVES else None


def paired_to_unpaired(rows: Sequence[dict], seed: int = 0) -> list[dict]:
    """Each pair -> one desirable and one undesirable row (ids suffixed '/chosen', '/rejected').

    The order alternates labels and, next to each other, prompts: pairs are shuffled by `seed`,
    then the desirable half of pair k is followed by the undesirable half of pair k+2. So every
    window of two or more rows holds both labels and (from 3 pairs on) mismatched prompts (a batch of one label
    trains KTO badly), while each half still appears exactly once.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    # Pair k's desirable half sits between the undesirable halves of pairs k+1 and k+2:
    # with 3 or more pairs no two neighbours share a prompt.
    step = 2 if len(order) >= 3 else 1
    out = []
    for k, index in enumerate(order):
        out.append(_half(rows[index], "chosen"))
        out.append(_half(rows[order[(k + step) % len(order)]], "rejected"))
    return out


def chosen_to_unpaired(rows: Sequence[dict]) -> list[dict]:
    """The chosen responses as desirable rows: SFT data for datasets without an sft.jsonl."""
    return [_half(row, "chosen") for row in rows]
