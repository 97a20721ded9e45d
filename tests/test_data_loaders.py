"""Every loader on its upstream-format fixture; no network (Hub access is stubbed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from halos.data import readers  # noqa: E402
from halos.data.errors import ErrorPolicy  # noqa: E402
from halos.data.loaders import LOADERS, get_loader, hh_split  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str, source: Path | str, split: str = "train", **options) -> list[dict]:
    return list(get_loader(name)(str(source), split, **options))


def texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages]


def test_registry_names_and_unknown_loader():
    assert {"hh", "shp", "oasst1", "ultrafeedback", "local", "synthetic"} <= set(LOADERS)
    with pytest.raises(KeyError, match="choose from"):
        get_loader("nope")


def test_hh_splits_shared_prefix_and_keeps_multi_turn_history():
    rows = load("hh", FIXTURES / "hh", subsets="helpful")
    assert len(rows) == 3 and {r["source"] for r in rows} == {"hh/helpful-base"}
    bread = next(r for r in rows if "bread" in r["prompt"][0]["content"])
    assert [m["role"] for m in bread["prompt"]] == ["user", "assistant", "user"]
    assert texts(bread["prompt"]) == ["Can you help me bake bread?", "Sure, what kind of bread?",
                                      "Sourdough."]
    assert texts(bread["chosen"]) == ["You will need a starter, flour, water and salt."]
    assert texts(bread["rejected"]) == ["Just buy it at the store."]
    cat = next(r for r in rows if "cat" in r["prompt"][0]["content"])
    assert cat["chosen"][0]["content"] == "How about \u201cMiso\u201d? It\u2019s short and sweet."


def test_hh_cuts_at_the_shared_assistant_marker():
    prompt, chosen, rejected = hh_split(
        "\n\nHuman: hi\n\nAssistant: a\n\nHuman: x\n\nAssistant: ok",
        "\n\nHuman: hi\n\nAssistant: a\n\nHuman: x\n\nAssistant: no\n\nAssistant: again")
    assert texts(prompt) == ["hi", "a", "x"]
    assert (chosen, rejected) == ("ok", "no\n\nAssistant: again")


def test_hh_subsets():
    assert len(load("hh", FIXTURES / "hh", subsets="harmless")) == 1
    assert len(load("hh", FIXTURES / "hh")) == 4
    assert len(load("hh", FIXTURES / "hh", "test", subsets=["helpful-base"])) == 1


def test_shp_ratio_filter_max_pairs_per_post_and_labels():
    policy = ErrorPolicy("raise")
    rows = load("shp", FIXTURES / "shp", domains="askculinary", on_error=policy)
    assert len(rows) == 6  # 5 of post p1 + p3; p2's ratio is below 2
    assert policy.filtered == {"score_ratio<2": 1, "over_5_pairs_per_post": 1}
    knife = next(r for r in rows if "knife" in r["prompt"][0]["content"])
    assert knife["chosen"][0]["content"] == "A \u00e9mincer knife."  # labels 0: B preferred
    assert {r["source"] for r in rows} == {"shp/askculinary"}
    assert len(load("shp", FIXTURES / "shp")) == 7  # every domain
    assert len(load("shp", FIXTURES / "shp", min_score_ratio=1.5, max_pairs_per_post=2)) == 5


def test_oasst1_pairs_ranked_siblings_with_history_and_language_filter():
    rows = load("oasst1", FIXTURES / "oasst1")
    assert len(rows) == 3
    deep = next(r for r in rows if len(r["prompt"]) == 3)
    assert texts(deep["prompt"]) == ["Explain photosynthesis in one sentence.",
                                     "Plants turn light, water and CO2 into sugar and oxygen.",
                                     "And where does the oxygen come from?"]
    assert texts(deep["chosen"]) == ["From splitting water molecules."]
    top = [r for r in rows if len(r["prompt"]) == 1]
    assert {r["chosen"][0]["content"] for r in top} == {
        "Plants turn light, water and CO2 into sugar and oxygen."}
    assert len(load("oasst1", FIXTURES / "oasst1", langs=None)) == 4
    assert len(load("oasst1", FIXTURES / "oasst1", "validation")) == 1


def test_ultrafeedback_binarized():
    rows = load("ultrafeedback", FIXTURES / "ultrafeedback", "train_prefs")
    assert len(rows) == 2
    assert rows[0]["prompt"] == [{"role": "user", "content": "Write a haiku about rain."}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Soft rain on the roof\n..."}]
    assert len(load("ultrafeedback", FIXTURES / "ultrafeedback", "test_prefs")) == 1


def test_local_both_shapes_and_string_shorthand():
    paired = load("local", FIXTURES / "local" / "paired.jsonl")
    assert paired[0]["id"] == "ex1" and paired[0]["prompt"][0]["role"] == "system"
    assert paired[1]["chosen"] == [{"role": "assistant", "content": "Rome."}]
    unpaired = load("local", FIXTURES / "local" / "unpaired.jsonl")
    assert [r["label"] for r in unpaired] == ["desirable", "undesirable"]


def test_ids_are_stable_content_hashes():
    first = [r["id"] for r in load("hh", FIXTURES / "hh")]
    again = [r["id"] for r in load("hh", FIXTURES / "hh")]
    assert first == again and len(set(first)) == len(first)
    alone = load("hh", FIXTURES / "hh", subsets="harmless")[0]["id"]
    assert alone in first  # independent of which other rows were loaded


def test_fixtures_read_by_datasets_like_the_hub(monkeypatch):
    """A Hub id goes through datasets.load_dataset; stub it with the same files read locally."""
    import datasets

    calls, real = [], datasets.load_dataset

    def fake_load_dataset(hub_id, split, **kwargs):
        calls.append((hub_id, split, kwargs))
        files = [str(p) for p in readers.split_files(FIXTURES / "ultrafeedback", split)]
        return real("parquet", data_files=files, split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", {})]
    assert hub == load("ultrafeedback", FIXTURES / "ultrafeedback", "train_prefs")


def test_hh_hub_uses_one_data_dir_per_subset(monkeypatch):
    import datasets

    real = datasets.load_dataset

    def fake_load_dataset(hub_id, split, data_dir):
        path = FIXTURES / "hh" / data_dir / f"{split}.jsonl.gz"
        return real("json", data_files=str(path), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load("hh", "Anthropic/hh-rlhf", subsets="helpful-base,harmless-base")
    assert sorted(r["id"] for r in hub) == sorted(r["id"] for r in load("hh", FIXTURES / "hh"))


def test_missing_local_path_is_a_clear_error():
    from halos.data.errors import DataError

    with pytest.raises(DataError, match="no such file"):
        load("hh", "./does/not/exist")
    with pytest.raises(DataError, match="no files for split 'dev'"):
        load("shp", FIXTURES / "shp", "dev")


def test_synthetic_loader_yields_the_generated_rows():
    from halos.data.synthetic import build

    rows = load("synthetic", "synthetic", "test", seed=2, n_train=10, n_test=5, n_sft=5, n_prompts=5)
    assert rows == build(seed=2, n_train=10, n_test=5, n_sft=5, n_prompts=5)["test"]
    with pytest.raises(KeyError, match="choose from"):
        load("synthetic", "synthetic", "dev")
