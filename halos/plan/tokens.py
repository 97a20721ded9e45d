"""The tokens a job processes.

Counted (`halos plan` with the data prepared and the tokenizer at hand): the job's own training
view of data/{dataset}/ (halos.train.dataview.load_view, the tokenizer plus the loss's special
tokens) and its step plan (halos.train.run.step_plan), summed exactly as the trainer sums the
`tokens` it logs per step in metrics.jsonl (every sequence of every microbatch, KTO's
mismatched KL pairs included); `halos ref-logps` jobs: the sequences it scores.

Estimated (no data yet, or no torch: Snakemake's resources): examples from the prepared
train.jsonl's line count, else the datasets table's `sizes` / `train_examples`, else the
upstream sizes below; every sequence counted at `max_length` tokens (`TOKENS_PER_SEQUENCE`,
an upper bound), with the same step arithmetic as the trainer's plan.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Training pairs of the upstream datasets (their dataset cards); OASST1 has no card figure for
# the pairs halos' loader builds (best reply vs each other ranked reply, English), so it is an
# approximation: prepare the data (`halos data prepare oasst1`) for the real count.
UPSTREAM_TRAIN_EXAMPLES = {"stanfordnlp/SHP": 348_718, "Anthropic/hh-rlhf": 160_800,
                           "OpenAssistant/oasst1": 20_000}
TOKENS_PER_SEQUENCE = "max_length"  # the estimate's tokens per sequence (an upper bound)
SEQUENCES = {"paired": 2, "unpaired": 1, "sft": 1}  # sequences per example in one forward


@dataclass(frozen=True)
class Tokens:
    trained: int = 0  # forward + backward
    scored: int = 0  # forward only (KL pairs, reference and eval scoring, prompt prefill)
    generated: int = 0  # sampled token by token
    steps: int = 0
    source: str = "estimated"  # or "counted"

    @property
    def total(self) -> int:
        return self.trained + self.scored + self.generated


# ------------------------------------------------------------------------------ estimated


def example_count(suite, dataset: str, kind: str) -> int:
    """Training examples a view of `kind` has (pairs; unpaired: two per pair; SFT: sft.jsonl's
    rows, else one chosen response per pair), capped by the row's `train_examples`."""
    row = suite.datasets[dataset]
    folder = Path("data") / dataset
    if kind == "sft" and (folder / "sft.jsonl").is_file():
        n = _lines(folder / "sft.jsonl")
    else:
        n = _lines(folder / "train.jsonl") if (folder / "train.jsonl").is_file() else None
        n = n if n is not None else _table_pairs(suite, dataset)
        n = 2 * n if kind == "unpaired" else n
    return min(n, row["train_examples"]) if row["train_examples"] else n


def _table_pairs(suite, dataset: str) -> int:
    row = suite.datasets[dataset]
    if row.get("sizes", {}).get("train"):
        return row["sizes"]["train"]
    if row.get("mix"):
        return sum(_table_pairs(suite, part) for part in row["mix"])
    if row.get("loader") == "synthetic":
        return int(row.get("options", {}).get("n_train", 0)) or _unknown(dataset)
    return UPSTREAM_TRAIN_EXAMPLES.get(row.get("source")) or _unknown(dataset)


def _unknown(dataset: str) -> int:
    raise ValueError(f"datasets table row {dataset!r}: no size to plan with; prepare it "
                     f"(`halos data prepare {dataset}`) or set `sizes: {{train: N}}`")


def _lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def estimated_steps(examples: int, micro: int, accum: int, world: int, epochs: int,
                    max_steps: int) -> int:
    """The trainer's step count (halos.train.batching.plan_steps drops incomplete microbatches
    and steps at the end of each epoch)."""
    steps = (examples // micro) // (accum * world) * epochs
    return min(steps, max_steps) if max_steps else steps


def estimated_train_tokens(examples: int, kind: str, with_kl: bool, steps: int, micro: int,
                           accum: int, world: int, max_length: int) -> Tokens:
    trained_examples = steps * micro * accum * world
    trained = trained_examples * SEQUENCES[kind] * max_length
    scored = trained_examples * max_length if with_kl else 0
    return Tokens(trained=trained, scored=scored, steps=steps)


# ------------------------------------------------------------------------------ counted


def load_tokenizer(path: str, extra_tokens: tuple[str, ...] = ()):
    """The tokenizer a job trains with: its start model's, plus the loss's special tokens
    (as halos.train.engine.load_causal_lm adds them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if extra_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)},
                                     replace_extra_special_tokens=False)
    return tokenizer


@lru_cache(maxsize=64)
def _view(cfg_key: tuple, tokenizer_path: str):
    """The tokenized training view of a job (cached: jobs with the same loss class, data
    options and tokenizer share it)."""
    from halos.config import TrainConfig
    from halos.losses import build_loss
    from halos.train.dataview import load_view

    cfg = TrainConfig(**dict(cfg_key))
    loss = build_loss(cfg.loss, {})
    tokenizer = load_tokenizer(tokenizer_path, loss.extra_special_tokens)
    with contextlib.redirect_stdout(sys.stderr):  # load_view reports its counts
        return load_view(cfg, loss, tokenizer, "train")


def counted_train_tokens(cfg, tokenizer_path: str, world: int) -> Tokens:
    """Exactly the tokens a `halos sft|align` job with options `cfg` logs, summed over steps."""
    from halos.train.run import step_plan

    # The loss class decides the view (batch kind, KL pairs, prompt suffix); its
    # hyperparameters do not, so variants of one class share it.
    view_keys = ("loss", "data", "max_length", "max_prompt_length",
                 "max_examples", "chat_template", "seed", "on_error", "packing")
    key = tuple((k, getattr(cfg, k)) for k in view_keys)
    view = _view(key, tokenizer_path)
    grad, kl = _example_tokens(view)
    plan = step_plan(cfg, view, world)
    trained = [i for step in plan for microbatch in step for i in microbatch]
    return Tokens(trained=sum(grad[i] for i in trained), scored=sum(kl[i] for i in trained),
                  steps=len(plan), source="counted")


def _example_tokens(view) -> tuple[list[int], list[int]]:
    """Per example: tokens of its trained sequences, and of its KL pair (scored only)."""
    grad = []
    for e in view.examples:
        if view.kind == "paired":
            grad.append(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids))
        else:
            grad.append(len(e.prompt_ids) + len(e.completion_ids))
    if view.kl_completions is None:
        return grad, [0] * len(grad)
    kl = [len(e.prompt_ids) + len(c) for e, c in zip(view.examples, view.kl_completions,
                                                       strict=True)]
    return grad, kl


def counted_reference_tokens(cfg, tokenizer_path: str) -> Tokens:
    """The tokens `halos ref-logps` scores: every sequence any loss may read from its file."""
    from halos.train.reference_pass import reference_sequences

    with contextlib.redirect_stdout(sys.stderr):
        sequences = reference_sequences(cfg, load_tokenizer(tokenizer_path))
    return Tokens(scored=sum(len(p) + len(r) for p, r in sequences), source="counted")
