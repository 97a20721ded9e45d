"""The data a loss trains on: prepared rows → tokenized examples of the loss's batch kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from halos.config import TrainConfig
from halos.data.errors import ErrorPolicy
from halos.data.types import TokenizedCompletion, TokenizedExample
from halos.losses.base import AlignmentLoss, BatchKind
from halos.train.batching import (
    Batch,
    example_length,
    kl_completions,
    kl_partners,
    make_batch,
    scored_sequences,
)


@dataclass
class DataView:
    examples: list[TokenizedExample]
    kind: BatchKind
    pad_id: int
    # The mismatched completion scored with each example's prompt (needs_kl_pairs losses).
    kl_completions: list[list[int]] | None = None
    packing: bool = False  # batches carry their sequences packed, prompts shared

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> list[int]:
        return [example_length(e) for e in self.examples]

    def batch(self, indices: list[int]) -> Batch:
        return make_batch(self.examples, indices, self.kind, self.pad_id, self.kl_completions,
                          self.packing)

    def labels(self) -> list[bool] | None:
        """Desirable flags of unpaired examples (None for pairs and SFT targets)."""
        if self.kind != "unpaired":
            return None
        return [e.desirable for e in self.examples]

    def label_counts(self) -> dict[str, int]:
        """Desirable / undesirable example counts (pairs count once each way)."""
        if self.kind == "paired":
            return {"desirable": len(self.examples), "undesirable": len(self.examples)}
        desirable = sum(bool(getattr(e, "desirable", True)) for e in self.examples)
        return {"desirable": desirable, "undesirable": len(self.examples) - desirable}

    def prompt_groups(self) -> list[list[int]] | None:
        """With packing, the unpaired halves of each preference pair (same pair, same prompt),
        which the step plan keeps in one microbatch so that it computes their prompt once, and
        their KL partners' prompt too: what a paired loss's microbatch holds anyway. Other
        examples of one prompt are not grouped (SHP has dozens of pairs per post: grouping them
        would change what a microbatch mixes). None where nothing is grouped."""
        from halos.data.convert import pair_of

        if not self.packing or self.kind != "unpaired":
            return None
        groups: dict[object, list[int]] = {}
        for i, example in enumerate(self.examples):
            pair = pair_of(example.id)
            key = (pair, tuple(example.prompt_ids)) if pair is not None else i
            groups.setdefault(key, []).append(i)
        return list(groups.values()) if len(groups) < len(self.examples) else None

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        return scored_sequences(self.examples, self.kind, self.kl_completions)


def read_split_rows(data: Path, split: str, kind: BatchKind, cfg: TrainConfig,
                    policy: ErrorPolicy | None = None) -> list[dict]:
    """Rows of `split` shaped for `kind`: SFT targets, pairs, or labelled completions. Bad rows
    raise, or with --on-error skip are counted in `policy`."""
    from halos.data.convert import paired_to_unpaired
    from halos.data.prepare import read_rows, sft_rows

    policy = policy or ErrorPolicy.of(cfg.on_error)
    if kind == "sft" and split == "train":
        return sft_rows(data, on_error=policy)
    path = data / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; prepare the dataset with `halos data prepare`")
    rows = read_rows(path, on_error=policy)
    if not rows:
        if split == "train":
            raise ValueError(f"{path}: the dataset is empty (0 training examples); "
                             f"prepare it again with `halos data prepare`")
        return rows
    is_paired = "chosen" in rows[0]
    if kind == "paired" and not is_paired:
        raise ValueError(f"{path}: holds unpaired (completion, label) rows, but the loss needs "
                         f"preference pairs; choose an unpaired loss (e.g. kto) for this dataset")
    if kind in ("unpaired", "sft") and is_paired:
        rows = paired_to_unpaired(rows, seed=cfg.seed)
    if kind == "sft":
        rows = [r for r in rows if r["label"] == "desirable"]
    return rows


def holds_pairs(path: Path, cfg: TrainConfig) -> bool:
    """Whether a prepared file holds preference pairs (its first valid row has `chosen`); bad
    rows raise here, or are skipped silently (load_view counts them)."""
    from halos.data.prepare import read_rows

    rows = read_rows(path, on_error="skip" if cfg.on_error == "skip" else "raise")
    return bool(rows) and "chosen" in rows[0]


def load_view(cfg: TrainConfig, loss: AlignmentLoss, tokenizer, split: str,
              kind: BatchKind | None = None, with_kl: bool | None = None) -> DataView:
    """Tokenize one split of `cfg.data` for `loss` (or for an explicit kind, for ref-logps)."""
    from halos.data.tokenize_cache import CACHE_DIR, tokenize_split

    kind = kind or loss.batch_kind
    with_kl = loss.needs_kl_pairs if with_kl is None else with_kl
    policy = ErrorPolicy.of(cfg.on_error)
    rows = read_split_rows(Path(cfg.data), split, kind, cfg, policy)
    limit = cfg.max_examples if split == "train" else cfg.eval_examples
    if limit and not with_kl:
        rows = rows[:limit]
    examples, report, cached = tokenize_split(
        rows, tokenizer, kind, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        chat_template=cfg.chat_template or None, policy=policy,
        cache_dir=Path(cfg.data) / CACHE_DIR)
    report_skips(f"{cfg.data} {split} ({kind})", report.n_in, len(examples),
                 report.n_truncated, policy, cached)
    examples = _with_prompt_suffix(examples, loss, tokenizer)
    partners = None
    if with_kl and examples:
        # Partners come from the whole split, so any prefix of it (a run's --max-examples or
        # --eval-examples) scores the same mismatched pairs as `halos ref-logps` did.
        partners = kl_completions(examples, kl_partners(len(examples), cfg.seed), cfg.max_length)
        if limit:
            examples, partners = examples[:limit], partners[:limit]
    return DataView(examples, kind, tokenizer.pad_token_id, partners, cfg.packing)


def report_skips(what: str, tokenized: int, kept: int, truncated: int,
                 policy: ErrorPolicy, cached: Path | None = None) -> None:
    """One line of counts ("tokenized N: kept K, dropped M (reason: count), truncated T", and
    "(read from FILE)" when the tokenization cache held it), then each skipped row (the first
    few) with its file:line and reason."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(policy.skipped.items()))
    dropped = f"dropped {policy.n_skipped}" + (f" ({reasons})" if reasons else "")
    source = f" (read from {cached})" if cached else ""
    print(f"[halos] {what}: tokenized {tokenized}: kept {kept}, {dropped}, truncated {truncated}"
          f"{source}", flush=True)
    for example in policy.examples:
        print(f"[halos]   skipped {example}", flush=True)
    if policy.n_skipped > len(policy.examples):
        print(f"[halos]   ... {policy.n_skipped - len(policy.examples)} more skipped rows",
              flush=True)


def _with_prompt_suffix(examples: list[TokenizedExample], loss: AlignmentLoss,
                        tokenizer) -> list[TokenizedExample]:
    """Append the loss's prompt suffix (e.g. CSFT's control token) to each prompt."""
    if not isinstance(examples[0] if examples else None, TokenizedCompletion):
        return examples
    out = []
    for e in examples:
        suffix = loss.prompt_suffix(e.desirable)
        if suffix:
            ids = tokenizer.encode(suffix, add_special_tokens=False)
            e = TokenizedCompletion(e.id, e.prompt_ids + ids, e.completion_ids, e.desirable)
        out.append(e)
    return out
