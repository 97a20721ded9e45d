"""`halos report` on a constructed results tree: the leaderboard's content, Holm within each
model × dataset, blanks for missing values, and valid PNG plots."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from halos.eval import stats
from halos.eval.cli import main_report
from halos.files import write_json

SIZES = {"tiny-1m": (128, 3), "tiny-3m": (192, 5), "tiny-8m": (256, 8)}
VOCAB = 512


def fake_weights(folder: Path, hidden: int, layers: int) -> int:
    """A safetensors file whose header declares a Llama's tensors (data left empty: the report
    reads headers only). Returns the declared parameter count."""
    shapes = {"model.embed_tokens.weight": [VOCAB, hidden], "model.norm.weight": [hidden]}
    for i in range(layers):
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = [3 * hidden, hidden]
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = [hidden, hidden]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset]}
    blob = json.dumps(header).encode()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    return sum(_numel(s) for s in shapes.values())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def judge_json(wins: int, ties: int, losses: int, score: float, base: float) -> dict:
    return {"judge": "synthetic", **stats.win_summary(wins, ties, losses), "invalid": 0,
            "judge_score": score, "baseline_score": base,
            "against_chosen": {**stats.win_summary(wins // 3, ties, losses + wins // 2)}}


# (wins, ties, losses) out of 200 prompts, per model and loss: bigger models gain more.
OUTCOMES = {
    "tiny-1m": {"dpo": (120, 60, 20), "kto": (110, 66, 24), "csft": (40, 120, 40), "ipo": (70, 90, 40)},
    "tiny-3m": {"dpo": (140, 50, 10), "kto": (136, 50, 14), "csft": (52, 110, 38), "ipo": (90, 80, 30)},
    "tiny-8m": {"dpo": (150, 44, 6), "kto": (152, 40, 8), "csft": (60, 100, 40)},
}


def build_tree(root: Path, with_second_dataset: bool = True) -> dict[str, int]:
    sizes = {}
    for model, losses in OUTCOMES.items():
        base = {"tiny-1m": 0.27, "tiny-3m": 0.33, "tiny-8m": 0.4}[model]
        for loss in ["sft", *losses]:
            folder = root / model / "synthetic" / loss
            sizes[model] = fake_weights(folder / "model", *SIZES[model])
            ev = folder / "eval"
            ev.mkdir(parents=True)
            if loss != "sft":
                wins, ties, lost = losses[loss]
                write_json(ev / "judge.json",
                           judge_json(wins, ties, lost, base + (wins - lost) / 200, base))
                write_json(ev / "judge_t0.7.json",
                           judge_json(wins - 20, ties + 10, lost + 10, 0.5, 0.2))
            reward = {"sft": None, "dpo": 0.78, "kto": 0.74, "csft": 0.55, "ipo": 0.7}[loss]
            pref = {"n": 400, "logp_accuracy": 0.6 + 0.1 * (loss != "sft"), "logp_margin": 1.5}
            if reward is not None:
                pref.update(reward_accuracy=reward, reward_margin=0.4)
            write_json(ev / "preference.json", pref)
            if loss != "ipo":  # ipo has no lm-eval results: blanks
                write_json(ev / "lm_eval.json", {"tasks": {
                    "adder_mc": {"acc": 0.3 + 0.1 * (loss != "sft"), "acc_stderr": 0.05,
                                 "acc_norm": 0.31},
                    "adder_gen": {"exact_match": 0.2 + 0.5 * (loss in ("dpo", "kto"))}},
                    "config": {}})
    if with_second_dataset:  # a dataset with only preference metrics for one model
        ev = root / "tiny-1m" / "hh" / "dpo" / "eval"
        ev.mkdir(parents=True)
        write_json(ev / "preference.json", {"n": 64, "reward_accuracy": 0.61,
                                            "logp_accuracy": 0.52})
    (root / "tiny-1m" / "synthetic" / "empty" / "eval").mkdir(parents=True)  # no outputs: no row
    return sizes


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_report_content(tmp_path: Path) -> None:
    results = tmp_path / "results"
    sizes = build_tree(results)
    out = results / "leaderboard.md"
    assert main_report(["--results", str(results), "--out", str(out)]) == 0
    rows = read_csv(out.with_suffix(".csv"))
    assert len(rows) == 3 * 1 + 11 + 1  # sft per model + judged losses + the hh row
    by = {(r["model"], r["dataset"], r["loss"]): r for r in rows}
    assert ("tiny-1m", "synthetic", "empty") not in by
    header = list(rows[0])
    for column in ("model", "size", "dataset", "loss", "win_rate", "ci90_lo", "ci90_hi",
                   "p_value", "p_holm", "judge_score", "reward_accuracy", "logp_accuracy",
                   "adder_mc/acc", "adder_gen/exact_match", "win_rate_t0.7"):
        assert column in header, column

    dpo = by["tiny-3m", "synthetic", "dpo"]
    summary = stats.win_summary(140, 50, 10)
    assert int(dpo["size"]) == sizes["tiny-3m"]
    assert float(dpo["win_rate"]) == pytest.approx(summary["win_rate"], abs=1e-5)
    assert float(dpo["ci90_lo"]) == pytest.approx(summary["ci90"][0], abs=1e-5)
    assert float(dpo["ci90_hi"]) == pytest.approx(summary["ci90"][1], abs=1e-5)
    assert float(dpo["reward_accuracy"]) == 0.78
    assert float(dpo["adder_gen/exact_match"]) == pytest.approx(0.7)
    # Holm over dpo, kto, csft, ipo of tiny-1m/synthetic, recomputed here.
    family = ["dpo", "kto", "csft", "ipo"]
    raw = [stats.win_summary(*OUTCOMES["tiny-1m"][f])["p_value"] for f in family]
    for loss, expected in zip(family, stats.holm(raw), strict=True):
        got = by["tiny-1m", "synthetic", loss]["p_holm"]
        assert float(got) == pytest.approx(expected, rel=1e-4, abs=1e-300), loss
    # Families are per model: tiny-8m has three losses.
    raw8 = [stats.win_summary(*OUTCOMES["tiny-8m"][f])["p_value"] for f in ("dpo", "kto", "csft")]
    assert float(by["tiny-8m", "synthetic", "csft"]["p_holm"]) == pytest.approx(
        stats.holm(raw8)[2], rel=1e-4)

    sft = by["tiny-1m", "synthetic", "sft"]
    assert sft["win_rate"] == "" and sft["p_holm"] == "" and sft["reward_accuracy"] == ""
    assert float(sft["judge_score"]) == pytest.approx(0.27)  # from its siblings' baseline_score
    assert by["tiny-1m", "synthetic", "ipo"]["adder_mc/acc"] == ""  # missing lm-eval: blank
    hh = by["tiny-1m", "hh", "dpo"]
    assert hh["win_rate"] == "" and float(hh["reward_accuracy"]) == 0.61 and hh["size"] == ""

    md = out.read_text()
    assert "| tiny-3m |" in md and "win rate vs sft (90% CI)" in md
    assert f"**{summary['win_rate']:.3f} [{summary['ci90'][0]:.3f}, {summary['ci90'][1]:.3f}]**" in md
    csft1 = stats.win_summary(*OUTCOMES["tiny-1m"]["csft"])
    assert f"| {csft1['win_rate']:.3f} [" in md  # not significant: not bold
    assert "adder_gen/exact_match" in md and "acc_stderr" not in md
    assert "Wilson" in md and "Holm" in md and "Reward accuracy" in md
    for name in ("winrate_vs_size", "winrate_heatmap", "reward_accuracy"):
        assert f"](plots/{name}.png)" in md


def test_plots_are_valid_images(tmp_path: Path) -> None:
    from PIL import Image

    results = tmp_path / "results"
    build_tree(results)
    main_report(["--results", str(results), "--out", str(results / "leaderboard.md")])
    for name in ("winrate_vs_size", "winrate_heatmap", "reward_accuracy"):
        path = results / "plots" / f"{name}.png"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300
            assert len(set(image.convert("L").getdata())) > 20  # not a blank canvas


def test_report_without_any_results_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "results" / "m" / "d" / "dpo" / "eval").mkdir(parents=True)
    with pytest.raises(ValueError, match="no results"):
        main_report(["--results", str(tmp_path / "results"),
                     "--out", str(tmp_path / "results" / "leaderboard.md")])
    with pytest.raises(FileNotFoundError):
        main_report(["--results", str(tmp_path / "nope"), "--out", str(tmp_path / "l.md")])


def test_single_model_tree_still_plots(tmp_path: Path) -> None:
    results = tmp_path / "results"
    folder = results / "tiny-1m" / "synthetic"
    fake_weights(folder / "dpo" / "model", 128, 3)
    write_json(folder / "dpo" / "eval" / "judge.json", judge_json(150, 30, 20, 0.9, 0.3))
    main_report(["--results", str(results), "--out", str(results / "leaderboard.md")])
    assert (results / "plots" / "winrate_vs_size.png").is_file()
    assert (results / "plots" / "winrate_heatmap.png").is_file()
    assert not (results / "plots" / "reward_accuracy.png").exists()  # nothing to plot


def test_require_win_checks_the_content(tmp_path: Path) -> None:
    results = tmp_path / "results"
    build_tree(results)
    out = str(results / "leaderboard.md")
    assert main_report(["--results", str(results), "--out", out, "--require-win", "dpo,kto"]) == 0
    with pytest.raises(ValueError, match=r"tiny-1m/synthetic/csft: win rate 0\.500"):
        main_report(["--results", str(results), "--out", out, "--require-win", "dpo,csft"])
    with pytest.raises(ValueError, match="slic: no judged results"):
        main_report(["--results", str(results), "--out", out, "--require-win", "slic"])
