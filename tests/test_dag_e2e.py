"""The DAG for real, with the real `halos`: the micro suite killed midway and resumed, a second
suite beside it that must not touch it, and (slow) the whole default tiny suite end to end with
its leaderboard."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_dag import MICRO, SNAKEFILE, count, dry_run, snakemake

REPO = Path(__file__).resolve().parent.parent


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TQDM_DISABLE="1", PYTHONUNBUFFERED="1")


def leaderboard_rows(work: Path, suite: str) -> list[dict]:
    with open(work / "results" / suite / "leaderboard.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The micro suite run for real: interrupted (Ctrl-C) once its dpo job has saved a
    checkpoint, then rerun to the end. (work dir, the interrupted run's snakemake log)."""
    work = tmp_path_factory.mktemp("micro") / "work"
    work.mkdir()
    config = ("--config", f"suite={MICRO}")
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(work),
               "--cores", "2", *config]
    proc = subprocess.Popen(command, env=env(), cwd=work, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = work / "results/micro/tiny-1m/synthetic/sft+dpo/checkpoints/latest"
    deadline = time.monotonic() + 900
    while not latest.exists():  # the dpo job has saved a checkpoint: interrupt it (Ctrl-C)
        assert proc.poll() is None, "snakemake ended before the dpo job saved a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=300)
    interrupted = {"model": (work / "results/micro/tiny-1m/synthetic/sft+dpo/model").exists(),
                   "checkpoint": latest.exists()}
    snakemake(work, "--cores", "2", *config, env=env(), timeout=1200)
    return work, interrupted


def test_micro_suite_killed_during_alignment_resumes_from_its_checkpoint(micro_run):
    work, interrupted = micro_run
    assert not interrupted["model"]
    assert interrupted["checkpoint"], "the checkpoint must survive (it is not a declared output)"
    log = (work / "logs/micro/align/tiny-1m/synthetic/sft+dpo.log").read_text()
    assert "resumed from" in log, log[-2000:]
    rows = leaderboard_rows(work, "micro")
    assert {r["loss"] for r in rows} == {"sft", "sft+dpo", "sft+kto"}
    assert dry_run(work, "--config", f"suite={MICRO}", env=env()) == []


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """(mtime, sha256) of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_suite_leaves_the_first_untouched(micro_run, tmp_path: Path):
    """A copy of the micro suite with one changed row, under another name, in the same work
    folder: it shares data/ and models/, trains into results/micro-b/, and the first suite's
    results, logs and leaderboard stay byte for byte (and mtime for mtime) as they were."""
    work, _ = micro_run
    before = {d: _snapshot(work / d) for d in ("results/micro", "logs/micro", "data", "models")}
    spec = yaml.safe_load(MICRO.read_text())
    spec["name"] = "micro-b"
    spec["tables"] = {k: str((MICRO.parent / v).resolve()) for k, v in spec["tables"].items()}
    losses = yaml.safe_load(Path(spec["tables"]["losses"]).read_text())
    losses["sft+kto"]["params"]["beta"] = 0.2
    (tmp_path / "micro-b-losses.yaml").write_text(yaml.safe_dump(losses))
    spec["tables"]["losses"] = str(tmp_path / "micro-b-losses.yaml")
    (tmp_path / "micro-b.yaml").write_text(yaml.safe_dump(spec))

    config = ("--config", f"suite={tmp_path / 'micro-b.yaml'}")
    planned = count(dry_run(work, *config, env=env()))
    assert "prepare_data" not in planned and "tiny_model" not in planned  # shared, identical
    snakemake(work, "--cores", "2", *config, env=env(), timeout=1200)

    for folder, files in before.items():
        assert _snapshot(work / folder) == files, f"{folder} changed"
    assert {r["loss"] for r in leaderboard_rows(work, "micro")} == {"sft", "sft+dpo", "sft+kto"}
    second = leaderboard_rows(work, "micro-b")
    assert {r["loss"] for r in second} == {"sft", "sft+dpo", "sft+kto"}
    kto = "tiny-1m/synthetic/sft+kto/model/halos_training.json"
    betas = [json.loads((work / "results" / suite / kto).read_text())["config"]["loss_params"]
             for suite in ("micro", "micro-b")]
    assert betas == [{"beta": 0.1}, {"beta": 0.2}]
    assert dry_run(work, "--config", f"suite={MICRO}", env=env()) == []


@pytest.mark.slow
def test_tiny_suite_end_to_end(tmp_path: Path):
    """The README's first command on a fresh directory: every run of the default suite ends
    on the leaderboard; a rerun has nothing to do."""
    start = time.monotonic()
    snakemake(tmp_path, "--cores", "all", env=env(), timeout=3600)
    print(f"tiny suite: {time.monotonic() - start:.0f} s")
    import halos.suite as hs

    suite = hs.load_suite()
    rows = leaderboard_rows(tmp_path, "tiny")
    assert {(r["model"], r["dataset"], r["loss"]) for r in rows} == {
        (r.model, r.dataset, r.loss) for r in suite.runs}
    assert (tmp_path / "results/tiny/leaderboard.md").read_text().count("\n") >= len(suite.runs)
    check_leaderboard_values(suite, rows)
    assert list((tmp_path / "results/tiny/plots").glob("*.png"))
    for run in suite.runs:
        for path in hs.eval_files(suite, run):
            assert (tmp_path / path).is_file(), path
    assert dry_run(tmp_path, env=env()) == []


def _number(row: dict, column: str) -> float:
    value = row[column]
    assert value not in ("", None), f"{row['model']}/{row['loss']}: empty {column}"
    return float(value)


def check_leaderboard_values(suite, rows: list[dict]) -> None:
    """Every cell the suite's evals promise holds a number in range, from the real runs."""
    for row in rows:
        reward_model = suite.is_reward_model(row["loss"])
        reference_based = suite.losses[row["loss"]]["class"] in ("dpo", "cdpo", "robust", "ipo",
                                                                  "kto")
        assert int(row["size"]) > 100_000
        assert 0.0 <= _number(row, "logp_accuracy" if not reward_model else "reward_accuracy") <= 1
        if reference_based:
            assert 0.0 <= _number(row, "reward_accuracy") <= 1.0
        if reward_model:
            continue
        assert 0.0 <= _number(row, "judge_score") <= 1.0
        assert 0.0 <= _number(row, "adder_mc/acc") <= 1.0
        assert 0.0 <= _number(row, "adder_gen/exact_match") <= 1.0
        if row["loss"] != "sft":
            low, rate, high = (_number(row, c) for c in ("ci90_lo", "win_rate", "ci90_hi"))
            assert 0.0 <= low <= rate <= high <= 1.0
            assert _number(row, "n") == suite.eval["sample"]["n"]
            assert 0.0 <= _number(row, "p_holm") <= 1.0
    check_alignment_wins(rows)


def check_alignment_wins(rows: list[dict]) -> None:
    """The embedded task really aligns. On every model DPO and KTO answer correctly more often
    than SFT and win more comparisons than they lose; on tiny-1m (the budget's main target) the
    90% confidence interval of their win rate excludes 0.5. Measured: tiny-1m DPO 0.568 [0.509,
    0.624], KTO 0.615 [0.557, 0.670]; tiny-3m DPO 0.588 [0.529, 0.643], KTO 0.545 [0.487, 0.602]."""
    by_run = {(r["model"], r["loss"]): r for r in rows}
    for (model, loss), row in by_run.items():
        if loss not in ("sft+dpo", "sft+kto"):
            continue
        assert _number(row, "judge_score") > _number(by_run[(model, "sft")], "judge_score"), row
        assert _number(row, "win_rate") > 0.5, row
        if model == "tiny-1m":
            assert _number(row, "ci90_lo") > 0.5, f"{model}/{loss} does not beat SFT: {row}"
