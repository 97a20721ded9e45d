"""Each kind of bad input: a DataError naming file and line, or with on_error='skip' a count."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from halos.data.errors import DataError, ErrorPolicy  # noqa: E402
from halos.data.loaders import get_loader  # noqa: E402
from halos.data.prepare import prepare_dataset, read_rows  # noqa: E402
from halos.data.tokenize import tokenize_paired  # noqa: E402
from halos.models.tiny import train_tokenizer  # noqa: E402

GOOD = {"prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]}


def line(**changes) -> bytes:
    row = {**GOOD, **changes}
    return json.dumps({k: v for k, v in row.items() if v is not None}).encode() + b"\n"


BAD_LINES = {
    "malformed_json": b'{"prompt": "2+2?", "chosen": "4",\n',
    "missing_field": line(rejected=None),
    "empty_completion": line(chosen=[{"role": "assistant", "content": "  "}]),
    "identical_pair": line(rejected=[{"role": "assistant", "content": "4"}]),
    "non_utf8": b'{"prompt": "caf\xe9?", "chosen": "4", "rejected": "5"}\n',
}


def write(path: Path, bad: bytes) -> Path:
    good = line()
    other = line(prompt="3+3?", chosen="6", rejected="7")
    path.write_bytes(good + bad + other)
    return path


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_raises_with_file_and_line(tmp_path, reason):
    path = write(tmp_path / "mine.jsonl", BAD_LINES[reason])
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert info.value.reason == reason
    assert info.value.file == str(path) and info.value.line == 2
    assert f"{path}:2:" in str(info.value) and "on_error='skip'" in str(info.value)


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_skipped_and_counted(tmp_path, reason):
    path = write(tmp_path / "mine.jsonl", BAD_LINES[reason])
    policy = ErrorPolicy("skip")
    rows = read_rows(path, on_error=policy)
    assert len(rows) == 2 and rows.lines == [1, 3]
    assert policy.skipped == {reason: 1}
    assert f"{path}:2:" in policy.examples[0]


def test_prepare_reports_skips_at_the_end(tmp_path, capsys):
    path = write(tmp_path / "mine.jsonl", BAD_LINES["identical_pair"])
    report = prepare_dataset("local", str(path), tmp_path / "out", splits={"train": "train"},
                             on_error="skip")
    assert report.counts == {"train": 2} and report.skipped == {"identical_pair": 1}
    assert "skipped bad input: 1 (identical_pair=1)" in report.summary()
    with pytest.raises(DataError, match=r"mine.jsonl:2: chosen is identical to rejected"):
        prepare_dataset("local", str(path), tmp_path / "out2", splits={"train": "train"})
    assert not (tmp_path / "out2").exists()


def test_upstream_format_errors_are_located(tmp_path):
    folder = tmp_path / "hh" / "helpful-base"
    folder.mkdir(parents=True)
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello"}]
    with gzip.open(folder / "train.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    hh = get_loader("hh")
    with pytest.raises(DataError, match=r"train.jsonl.gz:2: missing field 'rejected'"):
        list(hh(str(tmp_path / "hh"), "train"))
    policy = ErrorPolicy("skip")
    assert len(list(hh(str(tmp_path / "hh"), "train", on_error=policy))) == 1
    assert policy.skipped == {"missing_field": 1}


def test_prompt_longer_than_max_length(tmp_path):
    tokenizer = train_tokenizer(["2+2? 4 5 3+3? 6 7 user assistant"] * 4, vocab_size=300)
    long_prompt = "2+2? " * 40
    path = tmp_path / "mine.jsonl"
    path.write_bytes(line() + line(prompt=long_prompt) + line())
    rows = read_rows(path)
    kwargs = {"max_length": 64, "max_prompt_length": None}
    with pytest.raises(DataError, match=rf"{path}:2: prompt is \d+ tokens") as info:
        tokenize_paired(rows, tokenizer, **kwargs)
    assert info.value.reason == "prompt_too_long"
    kept, report = tokenize_paired(rows, tokenizer, on_error="skip", **kwargs)
    assert len(kept) == 2 and report.n_dropped == 1
    assert report.reasons["prompt_too_long"] == 1 and "dropped 1" in report.summary()
    # With max_prompt_length the same prompt is left-truncated instead of dropped.
    kept, report = tokenize_paired(rows, tokenizer, max_length=64, max_prompt_length=32)
    assert len(kept) == 3 and report.n_truncated == 1 and len(kept[1].prompt_ids) == 32
