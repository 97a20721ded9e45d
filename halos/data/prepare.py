"""`prepare_dataset`: load, validate and write a dataset's normalized files once, atomically.

The output folder holds `<split>.jsonl` per split (paired rows) and `report.json` with the counts;
the synthetic task adds `sft.jsonl` and `prompts.jsonl`. Every job of the DAG reads those bytes.

A source that is one local file holds one split: asked for train and test (the default), its
distinct prompts are split, seeded, HELD_OUT_FRACTION of them (with all their rows) into test, so
no prompt is in both; a folder with `train.jsonl` and `test.jsonl` chooses the test rows instead.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from halos.data import synthetic
from halos.data.convert import chosen_to_unpaired
from halos.data.errors import DataError, ErrorPolicy, OnError
from halos.data.loaders import DEFAULT_SPLITS, checked_loader_options, get_loader, normalized_rows
from halos.data.readers import file_records
from halos.data.rows import as_messages
from halos.files import atomic_dir, write_json, write_jsonl

HELD_OUT_FRACTION = 0.1  # of a single file's distinct prompts, held out as its test split


@dataclass
class PrepareReport:
    loader: str
    source: str
    out_dir: str
    counts: dict[str, int]
    skipped: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{name}={n}" for name, n in self.counts.items())
        lines = [f"{self.loader} ({self.source}) -> {self.out_dir}: {counts}"]
        lines += [f"  {note}" for note in self.notes]
        for title, counter in (("skipped bad input", self.skipped),
                               ("filtered by dataset rules", self.filtered)):
            if counter:
                detail = ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))
                lines.append(f"  {title}: {sum(counter.values())} ({detail})")
        lines += [f"  e.g. {example}" for example in self.error_examples]
        return "\n".join(lines)


class RowList(list):
    """Rows read from one file; `lines[i]` is the 1-based line (or row) of `self[i]` in `path`."""

    def __init__(self, rows: Iterable[dict] = (), path: str | None = None,
                 lines: list[int] | None = None):
        super().__init__(rows)
        self.path, self.lines = path, lines or []


def _dedupe(rows: Iterable[dict], policy: ErrorPolicy) -> list[dict]:
    seen: dict[str, dict] = {}
    for row in rows:
        if row["id"] in seen:
            policy.note("duplicate")
        else:
            seen[row["id"]] = row
    return list(seen.values())


def _subsample(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded random subset of `limit` rows, kept in their original order."""
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), int(limit)))
    return [rows[i] for i in keep]


def check_output_folder(out: str | Path) -> None:
    """An output folder may exist (it is replaced atomically) but not be a file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"--out {out} is a file; give a folder path (it is written atomically)")


def prepare_dataset(loader: str, source: str, out_dir: str | Path, *,
                    splits: dict[str, str] | None = None,
                    max_examples: dict[str, int] | None = None, seed: int = 0,
                    on_error: OnError = "raise", **loader_options) -> PrepareReport:
    """Write `out_dir/<split>.jsonl` for each `{out_split: upstream_split}` (default: the
    loader's) and `report.json`; nothing is written unless every split loads."""
    loader_options = checked_loader_options(loader, loader_options)
    check_output_folder(out_dir)
    if loader == "synthetic":
        counts = synthetic.generate(out_dir, seed=seed, **loader_options)
        return PrepareReport(loader, "synthetic", str(out_dir), counts)
    load = get_loader(loader)
    policy = ErrorPolicy.of(on_error)
    splits = splits or DEFAULT_SPLITS[loader]
    notes: list[str] = []
    if Path(source).is_file():
        rows = _dedupe(load(source, "train", on_error=policy, **loader_options), policy)
        data = _one_file_splits(rows, list(splits), Path(source), seed, notes)
    else:
        data = {name: _dedupe(load(source, upstream, on_error=policy, **loader_options), policy)
                for name, upstream in splits.items()}
    for name, upstream in splits.items():
        data[name] = _subsample(data[name], (max_examples or {}).get(name), seed)
        if not data[name]:
            raise DataError(f"split {name!r} (upstream {upstream!r}) has no usable examples; "
                            f"{policy.summary()}", file=str(source))
    report = PrepareReport(loader, str(source), str(out_dir),
                           {name: len(rows) for name, rows in data.items()},
                           dict(policy.skipped), dict(policy.filtered), policy.examples, notes)
    with atomic_dir(out_dir) as tmp:
        for name, rows in data.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        write_json(tmp / "report.json", {**asdict(report), "seed": seed,
                                         "options": {k: str(v) for k, v in loader_options.items()}})
    return report


def _one_file_splits(rows: list[dict], names: list[str], path: Path, seed: int,
                     notes: list[str]) -> dict[str, list[dict]]:
    """The splits `names` of the rows of one file: all of them for one split; for train and
    test, a seeded HELD_OUT_FRACTION of the distinct prompts (all their rows) in test."""
    if len(names) == 1:
        return {names[0]: rows}
    if sorted(names) != ["test", "train"]:
        raise DataError(f"one file holds one split, not {names}: ask for one split (--split "
                        f"train=train) or for train and test ({HELD_OUT_FRACTION:.0%} of its "
                        f"prompts held out), or pass a folder with train.jsonl and test.jsonl",
                        file=str(path))
    key = {id(row): json.dumps(row["prompt"], sort_keys=True) for row in rows}
    prompts = sorted(set(key.values()))
    if len(prompts) < 2:
        raise DataError(f"only {len(prompts)} distinct prompt(s): nothing to hold out as the test "
                        f"split; pass a folder with train.jsonl and test.jsonl", file=str(path))
    n_test = max(1, round(HELD_OUT_FRACTION * len(prompts)))
    held_out = set(random.Random(seed).sample(prompts, n_test))
    notes.append(f"test: held out {n_test} of {len(prompts)} prompts ({HELD_OUT_FRACTION:.0%}, "
                 f"seed {seed}) of {path} with all their rows, so no prompt is in both splits; "
                 f"to choose the test rows, pass a folder with train.jsonl and test.jsonl")
    return {"train": [row for row in rows if key[id(row)] not in held_out],
            "test": [row for row in rows if key[id(row)] in held_out]}


def read_rows(path: str | Path, on_error: OnError | ErrorPolicy = "raise") -> RowList:
    """Validated normalized rows (paired or unpaired, detected) of a JSONL/JSON/Parquet file."""
    policy = ErrorPolicy.of(on_error)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}", reason="missing_file")
    out = RowList(path=str(path))
    for rec, row in normalized_rows(file_records(path, policy), policy, path.name.split(".")[0]):
        out.append(row)
        out.lines.append(rec.line)
    return out


def read_prompts(path: str | Path) -> list[dict]:
    """Rows of a prompts file (`id`, `prompt` messages, plus whatever its judge needs)."""
    policy = ErrorPolicy("raise")
    rows = []
    for rec in file_records(path, policy):
        try:
            rows.append({**rec.data, "prompt": as_messages(rec.data.get("prompt"), "user", "prompt")})
        except DataError as err:
            policy.handle(err.at(rec.file, rec.line))
    return rows


def sft_rows(out_dir: str | Path, on_error: OnError | ErrorPolicy = "raise") -> list[dict]:
    """`sft.jsonl`'s rows if the dataset has one, else train.jsonl's chosen responses."""
    out_dir = Path(out_dir)
    if (out_dir / "sft.jsonl").is_file():
        return read_rows(out_dir / "sft.jsonl", on_error)
    return chosen_to_unpaired(read_rows(out_dir / "train.jsonl", on_error))
