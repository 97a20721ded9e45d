"""Datasets: loaders to two normalized row shapes, tokenization, and the embedded synthetic task.

- `loaders`: one function per source, registered in `LOADERS`
- `prepare`: `prepare_dataset` writes normalized JSONL once; `read_rows`, `sft_rows` read it back
- `convert`: paired -> unpaired
- `tokenize`: rows -> `types.TokenizedPair` / `TokenizedCompletion`
- `synthetic`: the seeded "helpful adder" task and its judge
"""
