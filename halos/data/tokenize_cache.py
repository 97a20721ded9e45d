"""Tokenize a split once per (tokenizer, chat template, rows, length limits), then read it back.

Every job on a (model, dataset) — the reference pass and each loss's alignment run — tokenizes
the same rows with the same tokenizer; on HH-sized data that is minutes of CPU per job. The
result is stored next to the prepared data under `.tokenized/`, named by a hash of everything
that decides it (the rows themselves, the tokenizer's full definition and special tokens, the
chat template, the batch kind and the length limits), so a cached file can never be stale: any
change is a different name. Where the data folder is read-only nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from halos.data.errors import ErrorPolicy
from halos.data.tokenize import TokenizeReport, tokenize_paired, tokenize_unpaired
from halos.data.types import (
    TokenizedCompletion,
    TokenizedExample,
    TokenizedPair,
    token_parts,
)
from halos.files import atomic_file

CACHE_DIR = ".tokenized"
_FORMAT = 1  # bump when tokenization's output changes for the same inputs


def tokenize_split(rows: Sequence[dict], tokenizer, kind: str, *, max_length: int,
                   max_prompt_length: int | None, chat_template: str | None,
                   policy: ErrorPolicy, cache_dir: Path | None
                   ) -> tuple[list[TokenizedExample], TokenizeReport, Path | None]:
    """(examples, report, the cache file read or None) for `rows`; a miss tokenizes and, when
    no row was dropped and `cache_dir` is writable, stores the result."""
    key = None
    if cache_dir is not None:
        key = _cache_key(rows, tokenizer, kind, max_length, max_prompt_length, chat_template)
    path = cache_dir / f"{kind}-{key}.npz" if key else None
    if path is not None and path.is_file():
        examples, report = _read(path, kind)
        return examples, report, path
    tokenize = tokenize_paired if kind == "paired" else tokenize_unpaired
    examples, report = tokenize(rows, tokenizer, max_length=max_length,
                                max_prompt_length=max_prompt_length,
                                chat_template=chat_template, on_error=policy)
    if path is not None and examples and report.n_dropped == 0:
        try:
            _write(path, examples, report, kind)
        except OSError:  # a read-only or full data folder: tokenize each time
            pass
    return examples, report, None


def _cache_key(rows: Sequence[dict], tokenizer, kind: str, max_length: int,
               max_prompt_length: int | None, chat_template: str | None) -> str | None:
    """Hash of everything the tokenized split depends on; None for a tokenizer without a full
    serialised definition (a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256()
    header = {"format": _FORMAT, "kind": kind, "max_length": max_length,
              "max_prompt_length": max_prompt_length, "chat_template": chat_template,
              "template": tokenizer.chat_template, "bos": tokenizer.bos_token_id,
              "eos": tokenizer.eos_token_id, "special": str(tokenizer.special_tokens_map)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(backend.to_str().encode())
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:40]


def _write(path: Path, examples: list[TokenizedExample], report: TokenizeReport,
           kind: str) -> None:
    parts = [part for e in examples for part in token_parts(e)]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    flat = np.fromiter((t for p in parts for t in p), dtype=np.int64, count=int(lengths.sum()))
    counts = {"n_in": report.n_in, "n_kept": report.n_kept, "n_truncated": report.n_truncated,
              "reasons": dict(report.reasons)}
    with atomic_file(path, "wb") as handle:
        np.savez(handle, ids=flat, lengths=lengths, names=np.array([e.id for e in examples]),
                 desirable=np.array([getattr(e, "desirable", True) for e in examples]),
                 report=np.array(json.dumps(counts)))


def _read(path: Path, kind: str) -> tuple[list[TokenizedExample], TokenizeReport]:
    with np.load(path, allow_pickle=False) as stored:
        ends = np.cumsum(stored["lengths"]).tolist()
        flat = stored["ids"].tolist()
        names, desirable = stored["names"].tolist(), stored["desirable"].tolist()
        counts = json.loads(str(stored["report"]))
    starts = [0, *ends[:-1]]
    parts = [flat[s:e] for s, e in zip(starts, ends, strict=True)]
    width = 3 if kind == "paired" else 2
    examples: list[TokenizedExample] = []
    for i, name in enumerate(names):
        own = parts[i * width : (i + 1) * width]
        examples.append(TokenizedPair(name, *own) if kind == "paired"
                        else TokenizedCompletion(name, *own, desirable=bool(desirable[i])))
    reasons = counts.pop("reasons")
    report = TokenizeReport(**counts)
    report.reasons.update(reasons)
    return examples, report
