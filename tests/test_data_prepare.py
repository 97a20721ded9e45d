"""prepare_dataset / CLI writes, reading back, paired -> unpaired, and the synthetic task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from halos.data import synthetic  # noqa: E402
from halos.data.cli import main  # noqa: E402
from halos.data.convert import chosen_to_unpaired, paired_to_unpaired  # noqa: E402
from halos.data.errors import DataError  # noqa: E402
from halos.data.prepare import prepare_dataset, read_prompts, read_rows, sft_rows  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = {"n_train": 200, "n_test": 40, "n_sft": 300, "n_prompts": 30}


def test_prepare_writes_normalized_files_and_counts(tmp_path):
    out = tmp_path / "hh"
    report = prepare_dataset("hh", str(FIXTURES / "hh"), out, seed=0)
    assert report.counts == {"train": 4, "test": 2}
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "test.jsonl", "train.jsonl"]
    assert json.loads((out / "report.json").read_text())["counts"] == report.counts
    rows = read_rows(out / "train.jsonl")
    assert len(rows) == 4 and rows.lines == [1, 2, 3, 4]
    assert rows == [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    again = prepare_dataset("hh", str(FIXTURES / "hh"), tmp_path / "again", seed=0)
    assert again.counts == report.counts
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


def test_prepare_max_examples_and_loader_splits(tmp_path):
    report = prepare_dataset("ultrafeedback", str(FIXTURES / "ultrafeedback"), tmp_path / "uf",
                             max_examples={"train": 1})
    assert report.counts == {"train": 1, "test": 1}
    report = prepare_dataset("oasst1", str(FIXTURES / "oasst1"), tmp_path / "oa",
                             splits={"train": "train", "dev": "validation"}, langs=None)
    assert report.counts == {"train": 4, "dev": 1}


def test_prepare_is_atomic(tmp_path):
    out = tmp_path / "out"
    prepare_dataset("local", str(FIXTURES / "local" / "paired.jsonl"), out,
                    splits={"train": "train"})
    before = (out / "train.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text((FIXTURES / "local" / "paired.jsonl").read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        prepare_dataset("local", str(bad), out, splits={"train": "train"})
    assert (out / "train.jsonl").read_bytes() == before  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out"]  # no temp left
    with pytest.raises(DataError, match="has no usable examples"):
        prepare_dataset("local", str(bad), tmp_path / "none", splits={"train": "train"},
                        max_examples={"train": 0}, on_error="skip")
    assert not (tmp_path / "none").exists()


def test_cli_prepare_prints_counts(tmp_path, capsys):
    code = main(["data", "prepare", "--loader", "shp", "--source", str(FIXTURES / "shp"),
                 "--out", str(tmp_path / "shp"), "--split", "train=train",
                 "--option", "domains=askculinary", "--option", "max_pairs_per_post=2"])
    printed = capsys.readouterr().out
    assert code == 0 and "train=3" in printed and "over_2_pairs_per_post=4" in printed
    assert len(read_rows(tmp_path / "shp" / "train.jsonl")) == 3


def test_cli_prepare_from_table_and_errors(tmp_path, capsys):
    table = tmp_path / "datasets.yaml"
    table.write_text(f"mine:\n  loader: local\n  source: {FIXTURES / 'local' / 'unpaired.jsonl'}\n"
                     "  splits: {train: train}\n")
    assert main(["data", "prepare", "mine", "--config", str(table), "--out", str(tmp_path / "m")]) == 0
    assert "train=2" in capsys.readouterr().out
    assert main(["data", "prepare", "--loader", "nope", "--source", "x", "--out",
                 str(tmp_path / "n")]) == 2
    assert "choose from" in capsys.readouterr().err


def test_paired_to_unpaired_mixes_labels_and_prompts():
    rows = [{"id": f"p{i}", "source": "s", "prompt": [{"role": "user", "content": f"q{i}"}],
             "chosen": [{"role": "assistant", "content": f"good {i}"}],
             "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(6)]
    unpaired = paired_to_unpaired(rows, seed=1)
    assert len(unpaired) == 12
    assert [r["label"] for r in unpaired] == ["desirable", "undesirable"] * 6
    assert sorted(r["id"] for r in unpaired) == sorted(
        [f"p{i}/chosen" for i in range(6)] + [f"p{i}/rejected" for i in range(6)])
    for a, b in zip(unpaired, unpaired[1:], strict=False):
        assert a["prompt"] != b["prompt"]  # neighbours can form mismatched (prompt, reply) pairs
    good = next(r for r in unpaired if r["id"] == "p3/chosen")
    assert good["completion"][0]["content"] == "good 3" and good["prompt"] == rows[3]["prompt"]
    assert unpaired == paired_to_unpaired(rows, seed=1) != paired_to_unpaired(rows, seed=2)
    assert [r["label"] for r in chosen_to_unpaired(rows)] == ["desirable"] * 6


def test_sft_rows_falls_back_to_chosen(tmp_path):
    prepare_dataset("hh", str(FIXTURES / "hh"), tmp_path / "hh")
    rows = sft_rows(tmp_path / "hh")
    train = read_rows(tmp_path / "hh" / "train.jsonl")
    assert [r["completion"] for r in rows] == [r["chosen"] for r in train]
    assert {r["label"] for r in rows} == {"desirable"}


def test_read_rows_parquet_in_normalized_shape(tmp_path):
    rows = read_rows(FIXTURES / "local" / "unpaired.jsonl")
    pq.write_table(pa.Table.from_pylist(list(rows)), tmp_path / "rows.parquet")
    assert read_rows(tmp_path / "rows.parquet") == rows


def test_synthetic_is_deterministic_and_written_by_prepare(tmp_path):
    first = prepare_dataset("synthetic", "synthetic", tmp_path / "a", seed=3, **SMALL)
    synthetic.generate(tmp_path / "b", seed=3, **SMALL)
    synthetic.generate(tmp_path / "c", seed=4, **SMALL)
    assert first.counts == {"train": 200, "test": 40, "sft": 300, "prompts": 30}
    for name in ("train", "test", "sft", "prompts"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    assert len(read_rows(tmp_path / "a" / "train.jsonl")) == 200
    assert sft_rows(tmp_path / "a") == read_rows(tmp_path / "a" / "sft.jsonl")
    prompts = read_prompts(tmp_path / "a" / "prompts.jsonl")
    assert all(p["answer"] == p["a"] + p["b"] for p in prompts)


def test_synthetic_judge_agrees_with_labels_and_facts_are_held_out():
    splits = synthetic.build(seed=0)
    for row in splits["train"] + splits["test"]:
        assert synthetic.judge(row["prompt"], row["chosen"][0]["content"]) == 1.0
        assert synthetic.judge(row["prompt"], row["rejected"][0]["content"]) == 0.0
    facts = {split: {synthetic.operands(r["prompt"]) for r in splits[split]}
             for split in ("train", "test", "prompts")}
    assert not facts["train"] & facts["test"] and facts["prompts"] <= facts["test"]
    correct = sum(synthetic.judge(r["prompt"], r["completion"][0]["content"]) for r in splits["sft"])
    assert 0.40 < correct / len(splits["sft"]) < 0.50  # noisy SFT: about 45% correct
    wrong_by = {int(synthetic.NUMBER.findall(r["rejected"][0]["content"])[-1]) - sum(
        synthetic.operands(r["prompt"])) for r in splits["train"]
        if synthetic.NUMBER.findall(r["rejected"][0]["content"])}
    assert {-2, -1, 1, 2} <= wrong_by  # errors on both sides, not just "smaller is better"


def test_judge_and_compare():
    prompt = [{"role": "user", "content": "What is 7 plus 5?"}]
    assert synthetic.judge(prompt, "7 + 5 = 12.") == 1.0
    assert synthetic.judge(prompt, "The answer is 13.") == 0.0
    assert synthetic.judge(prompt, "I don't know.") == 0.0
    assert synthetic.judge(prompt, "12 or maybe 11, so 12.") == 0.0
    assert synthetic.compare(prompt, "12.", "13.") == 1.0
    assert synthetic.compare(prompt, "13.", "12.") == 0.0
    assert synthetic.compare(prompt, "no", "13.") == 0.5
    with pytest.raises(ValueError, match="not an adder prompt"):
        synthetic.judge([{"role": "user", "content": "hello"}], "12")


def test_cli_synthetic(tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path / "s"), "--seed", "1"]) == 0
    assert "train=3000" in capsys.readouterr().out


def test_mix_datasets(tmp_path: Path):
    from halos.data.errors import DataError
    from halos.data.mix import mix_datasets

    for part, n in (("a", 2), ("b", 3)):
        (tmp_path / part).mkdir()
        (tmp_path / part / "train.jsonl").write_text("{}\n" * n)
        (tmp_path / part / "test.jsonl").write_text("{}\n")
    counts = mix_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "mix")
    assert counts == {"train.jsonl": 5, "test.jsonl": 2}
    assert (tmp_path / "mix/train.jsonl").read_text().count("\n") == 5
    (tmp_path / "a" / "sft.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="sft.jsonl"):
        mix_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "mix2")
    assert not (tmp_path / "mix2").exists()
