"""From tokenized examples to padded tensors, and the deterministic order they are trained in.

The whole training schedule (which examples form which microbatch on which rank at which step)
is a pure function of the data lengths, the batch sizes and the seed. That is what makes a killed
run resume on exactly the batches it would have seen, at any world size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from halos.data.types import TokenizedCompletion, TokenizedExample, TokenizedPair
from halos.losses.base import BatchKind, Logps, PairedLogps, SFTLogps, TokenLogps, UnpairedLogps
from halos.train.packing import Packed, pack_when_smaller

BUCKET_WINDOW = 64  # microbatches sorted by length together; larger = less padding, less mixing


def sequence_key(prompt_ids: list[int], response_ids: list[int]) -> int:
    """A 64-bit identity of one scored sequence (prompt and response token ids)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(prompt_ids, dtype=np.int64).tobytes())
    digest.update(b"|")
    digest.update(np.asarray(response_ids, dtype=np.int64).tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True)


def kl_partners(n: int, seed: int) -> list[int]:
    """A derangement: partner[i] != i, shift-by-one over a seeded shuffled order.

    KTO's reference point scores (prompt_i, completion_partner[i]). Fixing the partner per example
    (rather than per microbatch) lets the reference log-probs of those mismatched pairs be
    precomputed once, independent of batch size, world size and epoch.
    """
    if n < 2:
        raise ValueError(f"mismatched KL pairs need at least 2 examples, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, 1)
    return partner.tolist()


def kl_completions(examples: list[TokenizedCompletion], partners: list[int],
                   max_length: int) -> list[list[int]]:
    """The completion scored with each example's prompt for the KL term (partner j's), cut so
    that prompt_i + completion_j fits `max_length`, as the tokenizer cuts every sequence.

    Tokenization leaves every prompt at most max_length - 1 tokens, so at least one token of
    each partner's completion stays.
    """
    return [examples[j].completion_ids[: max_length - len(e.prompt_ids)]
            for e, j in zip(examples, partners, strict=True)]


def scored_sequences(examples: list[TokenizedExample], kind: BatchKind,
                     kl_completions: list[list[int]] | None = None
                     ) -> list[tuple[list[int], list[int]]]:
    """Every (prompt, response) sequence a view of the data scores, in a fixed order."""
    if kind == "paired":
        return ([(e.prompt_ids, e.chosen_ids) for e in examples]
                + [(e.prompt_ids, e.rejected_ids) for e in examples])
    seqs = [(e.prompt_ids, e.completion_ids) for e in examples]
    if kl_completions is not None:
        seqs += [(e.prompt_ids, c) for e, c in zip(examples, kl_completions, strict=True)]
    return seqs


def example_length(example: TokenizedExample) -> int:
    if isinstance(example, TokenizedPair):
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    return len(example.prompt_ids) + len(example.completion_ids)


@dataclass
class Batch:
    """One microbatch: N padded sequences (N = 2B for pairs, chosen first) and what to pack."""

    kind: BatchKind
    size: int  # B examples
    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    loss_mask: torch.Tensor  # (N, T) true on scored (response) tokens
    keys: torch.Tensor  # (N,) sequence_key of each row, to look up reference log-probs
    desirable: torch.Tensor | None = None  # (B,) for unpaired
    kl: Batch | None = None  # mismatched pairs, scored without gradient
    packed: Packed | None = None  # the same sequences packed, prompts shared (--packing)

    @property
    def real_tokens(self) -> int:
        """Tokens of the sequences, as if each were its own row (padding and sharing aside)."""
        return int(self.attention_mask.sum())

    def engine_inputs(self, device: torch.device | str) -> tuple[tuple[torch.Tensor, ...], dict]:
        """(args, kwargs) of the model wrapper's forward for this batch, on `device`."""
        args = tuple(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask))
        return args, ({} if self.packed is None else {"packed": self.packed.to(device)})


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int, kind: BatchKind,
            size: int, desirable: list[bool] | None = None, packing: bool = False) -> Batch:
    """Right-pad `sequences` into tensors; the response part of each is the scored part. With
    `packing` the batch also carries them packed with prompts shared, where that saves work
    (halos/train/packing.py)."""
    longest = max(len(p) + len(r) for p, r in sequences)
    n = len(sequences)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    loss_mask = torch.zeros((n, longest), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt) : length] = True
    keys = torch.tensor([sequence_key(p, r) for p, r in sequences], dtype=torch.long)
    flags = None if desirable is None else torch.tensor(desirable, dtype=torch.bool)
    packed = pack_when_smaller(sequences, pad_id, longest) if packing else None
    return Batch(kind, size, input_ids, attention_mask, loss_mask, keys, flags, packed=packed)


def make_batch(examples: list[TokenizedExample], indices: list[int], kind: BatchKind, pad_id: int,
               kl_completions: list[list[int]] | None = None, packing: bool = False) -> Batch:
    chosen = [examples[i] for i in indices]
    if kind == "paired":
        return collate(scored_sequences(chosen, "paired"), pad_id, kind, len(chosen),
                       packing=packing)
    assert all(isinstance(e, TokenizedCompletion) for e in chosen)
    batch = collate(scored_sequences(chosen, kind), pad_id, kind, len(chosen),
                    desirable=[e.desirable for e in chosen], packing=packing)
    if kl_completions is not None:
        kl_seqs = [(examples[i].prompt_ids, kl_completions[i]) for i in indices]
        batch.kl = collate(kl_seqs, pad_id, kind, len(chosen), packing=packing)
    return batch


def pack_logps(batch: Batch, sums: torch.Tensor, tokens: torch.Tensor, average: bool,
               kl_sums: torch.Tensor | None = None, kl_tokens: torch.Tensor | None = None) -> Logps:
    """Turn per-row outputs of `batch` into the dataclass its loss expects."""
    values = sums / tokens.clamp(min=1) if average else sums
    if batch.kind == "paired":
        b = batch.size
        return PairedLogps(values[:b], values[b:], tokens[:b], tokens[b:])
    if batch.kind == "sft":
        return SFTLogps(values, tokens)
    kl = None
    if kl_sums is not None:
        kl = kl_sums / kl_tokens.clamp(min=1) if average else kl_sums
    return UnpairedLogps(values, tokens, batch.desirable, kl)


def pack_token_logps(batch: Batch, logps: torch.Tensor, mask: torch.Tensor,
                     values: torch.Tensor | None = None) -> TokenLogps:
    """Per-token outputs of `batch` ((N, T-1) grids) for a `token_level` loss; rows as in
    `batch` (chosen then rejected for pairs), labels of an unpaired batch."""
    return TokenLogps(logps, mask, batch.desirable, values)


def plan_steps(lengths: list[int], *, micro_batch_size: int, grad_accum: int, world_size: int,
               epochs: int, seed: int, bucketing: bool, labels: list[bool] | None = None,
               groups: list[list[int]] | None = None) -> list[list[list[int]]]:
    """steps[s][m] = example indices of microbatch m of optimizer step s.

    Each step holds grad_accum × world_size microbatches; rank r runs m = r, r + world, ….
    Incomplete microbatches and steps at the end of an epoch are dropped, so every rank does the
    same number of forward passes (ZeRO needs that). With `labels` (unpaired data), bucketing
    sorts each label by length separately and interleaves them, so that a label that is
    systematically shorter (e.g. refusals) does not end up in single-label microbatches. With
    `groups` (each example in exactly one), a group's examples stay next to each other in the
    order microbatches are cut from, so they share a microbatch unless they straddle its end
    (packing then computes their shared prompt once); without, every example is its own group.
    """
    groups = groups if groups is not None else [[i] for i in range(len(lengths))]
    per_step = grad_accum * world_size
    steps: list[list[list[int]]] = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = [groups[g] for g in rng.permutation(len(groups))]
        micro = _microbatches(order, lengths, micro_batch_size, bucketing, labels)
        if bucketing:
            micro = [micro[i] for i in rng.permutation(len(micro))]
        usable = len(micro) - len(micro) % per_step
        steps += [micro[i : i + per_step] for i in range(0, usable, per_step)]
    return steps


def _microbatches(order: list[list[int]], lengths: list[int], size: int, bucketing: bool,
                  labels: list[bool] | None) -> list[list[int]]:
    """Microbatches of `size` examples cut from the groups in `order` (the incomplete rest
    dropped), bucketed by length within windows of about BUCKET_WINDOW microbatches."""
    order = _leading_groups(order, size)
    if bucketing and order:
        window = max(1, size * BUCKET_WINDOW * len(order) // sum(map(len, order)))
        order = [group for i in range(0, len(order), window)
                 for group in _by_length(order[i : i + window], lengths, labels)]
    return _cut(order, size)


def _cut(order: list[list[int]], size: int) -> list[list[int]]:
    """Microbatches of exactly `size` examples: each group goes whole into the first unfilled
    microbatch with room for it (one longer than `size` first fills microbatches of its own);
    what stays unfilled at the end is cut in order, and the incomplete rest dropped. Singleton
    groups give consecutive cuts of the order."""
    full: list[list[int]] = []
    unfilled: list[list[int]] = []
    for group in order:
        whole = len(group) - len(group) % size
        full += [group[i : i + size] for i in range(0, whole, size)]
        group = group[whole:]
        if not group:
            continue
        at = next((k for k, m in enumerate(unfilled) if len(m) + len(group) <= size), None)
        if at is None:
            unfilled.append([])
            at = len(unfilled) - 1
        unfilled[at] += group
        if len(unfilled[at]) == size:
            full.append(unfilled.pop(at))
    rest = [i for m in unfilled for i in m]
    return full + [rest[i : i + size] for i in range(0, len(rest) - len(rest) % size, size)]


def _leading_groups(order: list[list[int]], size: int) -> list[list[int]]:
    """The longest prefix of `order` holding at most as many examples as whole microbatches of
    `size` take from all of them."""
    usable = sum(map(len, order)) // size * size
    taken = 0
    for count, group in enumerate(order):
        taken += len(group)
        if taken > usable:
            return order[:count]
    return order


def _by_length(groups: list[list[int]], lengths: list[int], labels: list[bool] | None
               ) -> list[list[int]]:
    """Sort groups by length (their longest example); with labels, sort each label (a group's,
    or "mixed") separately and spread them evenly."""
    def label(group: list[int]) -> object:
        return "mixed" if len({labels[j] for j in group}) > 1 else labels[group[0]]

    def length(position: int) -> int:
        return max(lengths[j] for j in groups[position])

    kinds = [None] * len(groups) if labels is None else [label(g) for g in groups]
    by_kind = [sorted((p for p in range(len(groups)) if kinds[p] == kind), key=length)
               for kind in sorted(set(kinds), key=_label_order)]
    # Item k of a kind of n sits at (k + ½)/n of the merged order, whatever the label ratio.
    placed = [((k + 0.5) / len(g), groups[p][0], p) for g in by_kind for k, p in enumerate(g)]
    return [groups[p] for *_, p in sorted(placed)]


def _label_order(kind: object) -> int:
    return {True: 0, False: 1}.get(kind, 2)
