"""Tokenization throughput (pairs/s) of `halos.data.tokenize.tokenize_paired`.

    python benchmarks/bench_tokenize.py --tokenizer models/tiny-1m --data data/synthetic \
        [--pairs 4096] [--out benchmarks/results/tokenize.json]

Rows are the dataset's train.jsonl repeated up to --pairs; each run is timed twice and the
faster one reported (the first pays the template compilation). `cached_pairs_per_s` reads the
same split back from the tokenization cache (halos/data/tokenize_cache.py), hashing included.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from halos.data.errors import ErrorPolicy
from halos.data.prepare import read_rows
from halos.data.tokenize import tokenize_paired
from halos.data.tokenize_cache import tokenize_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a model folder with a tokenizer")
    parser.add_argument("--data", required=True, help="a prepared paired dataset folder")
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--chat-template", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = read_rows(Path(args.data) / "train.jsonl")
    rows = [dict(r, id=f"{r['id']}-{i}") for i, r in
            enumerate(rows[i % len(rows)] for i in range(args.pairs))]
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        examples, _ = tokenize_paired(rows, tokenizer, max_length=args.max_length,
                                      max_prompt_length=None, chat_template=args.chat_template)
        best = min(best, time.perf_counter() - started)
    result = {"tokenizer": args.tokenizer, "pairs": len(examples), "seconds": round(best, 3),
              "pairs_per_s": round(len(examples) / best, 1),
              "cached_pairs_per_s": round(len(examples) / _cached_seconds(rows, tokenizer, args))}
    print(json.dumps(result))
    if args.out:
        tmp = f"{args.out}.tmp"
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.out)


def _cached_seconds(rows: list[dict], tokenizer, args: argparse.Namespace) -> float:
    """Seconds to read the split back from the tokenization cache (after one miss fills it)."""
    with tempfile.TemporaryDirectory() as cache:
        options = dict(max_length=args.max_length, max_prompt_length=None,
                       chat_template=args.chat_template, cache_dir=Path(cache))
        tokenize_split(rows, tokenizer, "paired", policy=ErrorPolicy.of("raise"), **options)
        started = time.perf_counter()
        _, _, hit = tokenize_split(rows, tokenizer, "paired", policy=ErrorPolicy.of("raise"),
                                   **options)
        assert hit is not None, "the second call must read the cache"
        return time.perf_counter() - started


if __name__ == "__main__":
    main()
