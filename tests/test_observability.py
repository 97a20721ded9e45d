"""What users look at while and after a run, with the real `halos` CLI:

- metrics.jsonl of a resumed run continues exactly where its checkpoint left off (no step twice),
  and `--overwrite` starts a fresh file;
- with --no-progress (every DAG job), the job's log shows progress lines while it runs;
- `--wandb` in offline mode writes a W&B run whose history (read back with wandb's own reader,
  `wandb leet inspect --json`) holds the values of metrics.jsonl, whose config holds the options
  and loss hyperparameters, named and grouped after the suite layout, with no secret in it; online
  PPO logs its TRL-named metrics there too;
- the report lists the suite's unfinished runs with their last step.

(The suite's HTML report in a real browser is tested in test_dag_e2e.py, on its micro suite.)
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, halos_env, run_halos

from halos.eval.progress import unfinished_runs
from halos.eval.report import report

WANDB = Path(sys.executable).parent / "wandb"
# Fake secrets in the environment of the W&B runs: neither may appear in any file they write.
SECRETS = {"WANDB_API_KEY": "halosfakewandbkey0000000000000000000000000",
           "HF_TOKEN": "hf_halosFakeTokenNeverWritten0000"}
# TRL's PPO trainer metric names, as W&B shows them (HF's W&B callback prefixes train/).
TRL_PPO_METRICS = ["objective/kl", "objective/entropy", "objective/non_score_reward",
                   "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
                   "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
                   "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_var",
                   "val/num_eos_tokens", "lr", "episode", "eps"]


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps_of(rows: list[dict], split: str) -> list[int]:
    return [r["step"] for r in rows if r["split"] == split]


def sft(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_halos("sft", "--model", model, "--data", data, "--out", out, *FAST,
                     "--learning-rate", "3e-3", *extra)


# ================================================================== metrics.jsonl and resume
def test_resumed_run_logs_every_step_once_and_overwrite_starts_a_fresh_file(
        tiny_model: Path, synthetic_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    sft(tiny_model, synthetic_data, out, "--max-steps", "6", "--save-every", "2",
        "--keep-checkpoints")
    first = rows_of(out)
    assert steps_of(first, "train") == [1, 2, 3, 4, 5, 6] and steps_of(first, "eval") == [6]

    # As if killed after the checkpoint of step 4 (steps 5, 6 and the eval already logged).
    shutil.rmtree(out / "model")
    for late in (out / "checkpoints").glob("step_*"):
        if int(late.name.removeprefix("step_")) > 4:
            shutil.rmtree(late)
    (out / "checkpoints" / "latest").write_text("step_4")
    result = sft(tiny_model, synthetic_data, out, "--max-steps", "6", "--save-every", "2",
                 "--keep-checkpoints")
    assert "resumed from" in result.stdout + result.stderr
    resumed = rows_of(out)
    assert steps_of(resumed, "train") == [1, 2, 3, 4, 5, 6] and steps_of(resumed, "eval") == [6]
    assert resumed[:4] == first[:4]  # the rows the checkpoint had seen are kept as they were
    for again, before in zip(resumed[4:], first[4:], strict=True):  # the same weights again
        assert again["loss"] == pytest.approx(before["loss"], rel=1e-5)

    shutil.rmtree(out / "checkpoints")
    sft(tiny_model, synthetic_data, out, "--max-steps", "3", "--overwrite")
    fresh = rows_of(out)
    assert steps_of(fresh, "train") == [1, 2, 3] and steps_of(fresh, "eval") == [3]


# ================================================================== progress lines in the log
PROGRESS_LINE = re.compile(r"\[halos\] (?P<name>\S+) step (?P<step>\d+)/(?P<total>\d+) \(\d+%\)"
                           r"(?P<rest>.*)$")


def progress_lines(log: Path) -> list[re.Match]:
    return [m for line in log.read_text().splitlines() if (m := PROGRESS_LINE.match(line))]


def test_a_jobs_log_shows_progress_lines_while_it_runs(tiny_model: Path, synthetic_data: Path,
                                                       tmp_path: Path) -> None:
    out, log, total = tmp_path / "sft", tmp_path / "sft.log", 60
    command = [sys.executable, "-m", "halos", "sft", "--model", str(tiny_model), "--data",
               str(synthetic_data), "--out", str(out), *FAST, "--learning-rate", "3e-3",
               "--max-steps", str(total), "--progress-every", "0.2"]
    with log.open("w") as handle:  # as Snakemake runs a job: stdout and stderr to its log
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=halos_env())
    try:
        deadline, running, seen = time.monotonic() + 300, True, []
        while running and len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = [m for m in progress_lines(log) if int(m["step"]) < total]
            running = proc.poll() is None  # after reading: the lines were there while it ran
        assert running and len(seen) >= 2, "no two progress lines in the log while it ran"
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    lines = progress_lines(log)
    assert lines[0]["step"] == "1" and lines[-1]["step"] == str(total)
    assert {m["name"] for m in lines} == {"sft"} and {m["total"] for m in lines} == {str(total)}
    steps = [int(m["step"]) for m in lines]
    assert steps == sorted(set(steps)) and len(steps) < total  # at an interval, not every step
    middle = lines[1]["rest"]
    for field in ("| loss ", "| tokens/s ", "| elapsed ", "| ETA ", "| peak RSS "):
        assert field in middle, middle
    by_step = {r["step"]: r for r in rows_of(out) if r["split"] == "train"}
    for m in lines:  # the loss shown is the one metrics.jsonl logged at that step
        shown = float(re.search(r"\| loss (\S+)", m["rest"])[1])
        assert shown == pytest.approx(by_step[int(m["step"])]["loss"], rel=1e-3)


# ================================================================== unfinished runs in the report
def test_report_lists_unfinished_runs_with_their_last_step(tmp_path: Path) -> None:
    suite = tmp_path / "results" / "s" / "tiny-1m" / "synthetic"
    done, running, waiting = suite / "sft", suite / "sft+dpo", suite / "sft+kto"
    (done / "model").mkdir(parents=True)
    (done / "eval").mkdir()
    (done / "eval" / "preference.json").write_text(json.dumps({"reward_accuracy": 0.75}))
    (done / "metrics.jsonl").write_text('{"step": 9, "split": "train", "loss": 0.1}\n')
    running.mkdir()
    (running / "metrics.jsonl").write_text(
        '{"step": 3, "split": "train", "loss": 0.693}\n'
        '{"step": 4, "split": "train", "loss": 0.5}\n{"step": 4, "split": "eval", "loss": 0.6}\n'
        '{"step": 5, "spl')  # torn by a kill: ignored
    waiting.mkdir()  # not started: not listed
    runs = [done, running, waiting]
    assert unfinished_runs(runs) == [{"model": "tiny-1m", "dataset": "synthetic",
                                      "loss": "sft+dpo", "step": 4, "train_loss": 0.5,
                                      "updated": unfinished_runs(runs)[0]["updated"]}]
    made = report([done, running], tmp_path / "leaderboard.md")
    text = Path(made["markdown"]).read_text()
    assert "## Unfinished runs" in text
    assert re.search(r"\| tiny-1m \| synthetic \| sft\+dpo \| 4 \| 0\.500 \|", text), text
    page = (tmp_path / "leaderboard.rst").read_text()  # the HTML report's page has it too
    assert "Unfinished runs\n~~~~~~~~~~~~~~~" in page and "     - sft+dpo\n     - 4\n" in page


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # writer_name, as Snakemake
def test_the_report_page_is_the_leaderboard_markdown_as_rst(tmp_path: Path) -> None:
    """leaderboard.md -> leaderboard.rst -> HTML (docutils, as Snakemake's report renders it):
    the same table cells, bold/italic markers, and the plot embedded as a data URI."""
    from docutils.core import publish_parts
    from PIL import Image

    from halos.eval.report_page import markdown_to_rst

    (tmp_path / "plots").mkdir()
    Image.new("RGB", (40, 30), "steelblue").save(tmp_path / "plots" / "scores.png")
    markdown = ("# Leaderboard\n\nWin rate vs `sft`: **bold ▲** = better, _italic ▼_ = worse.\n\n"
                "| model | loss | win rate |\n|---|---|---:|\n| tiny-1m | sft | |\n"
                "| tiny-1m | sft+dpo | **0.615 [0.557, 0.670]** ▲ |\n"
                "| tiny-1m | sft+kto | _0.412 [0.350, 0.470]_ ▼ |\n\n"
                "## Plots\n\n![scores](plots/scores.png)\n")
    html = publish_parts(markdown_to_rst(markdown, tmp_path), writer_name="html",
                         settings_overrides={"report_level": 2})["html_body"]
    assert "System Message" not in html
    assert re.search(r'<(tt|code) class="docutils literal">(<span class="pre">)?sft', html)
    assert "<strong>0.615 [0.557, 0.670]</strong> ▲" in html
    assert "<em>0.412 [0.350, 0.470]</em> ▼" in html and "<em>italic ▼</em>" in html
    assert html.count("<tr") == 4 and "sft+kto" in html
    src = re.search(r'<img alt="scores" class="plot" src="(data:image/png;base64,[^"]+)"', html)
    assert src, html[-500:]
    png = base64.b64decode(src[1].split(",", 1)[1])
    assert png == (tmp_path / "plots" / "scores.png").read_bytes()


# ================================================================== Weights & Biases, offline
@pytest.fixture()
def offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="pip install wandb (the logging extra; CI installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the default: the run folder's wandb/
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    for var, value in SECRETS.items():
        monkeypatch.setenv(var, value)


def wandb_records(run_folder: Path) -> list[dict]:
    """Every record of the run's offline W&B run(s), read by wandb's own reader."""
    runs = sorted((run_folder / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {run_folder / 'wandb'}"
    records = []
    for run in runs:
        shown = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run)],
                               capture_output=True, text=True, check=True, timeout=60)
        records += [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
    return records


def wandb_history(records: list[dict]) -> dict[int, dict]:
    history: dict[int, dict] = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            history.setdefault(int(item["_step"]), {}).update(item)
    return history


def assert_history_matches_metrics(out: Path, history: dict[int, dict]) -> None:
    """Every number of every metrics.jsonl row is in the W&B history at its step."""
    compared = 0
    for row in rows_of(out):
        for key, value in row.items():
            if key in ("step", "split", "time") or isinstance(value, str):
                continue
            logged = history[row["step"]][f"{row['split']}/{key}"]
            if value is None:  # NaN in metrics.jsonl
                assert logged is None or (isinstance(logged, str) and logged.lower() == "nan") \
                    or math.isnan(float(logged))
            else:
                assert float(logged) == pytest.approx(value, rel=1e-9, abs=1e-12), key
                compared += 1
    assert compared > 10


def assert_no_secret_under(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for var, secret in SECRETS.items():
                assert secret.encode() not in data, f"{var}'s value is written in {path}"


def run_record(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r["type"] == "run")


def test_wandb_offline_sft_and_dpo_runs_hold_the_metrics_and_config(
        offline_wandb, tiny_model: Path, sft_model: Path, synthetic_data: Path,
        tmp_path: Path) -> None:
    pair = tmp_path / "results" / "obs" / "tiny-1m" / "synthetic"
    sft_out, dpo_out, ref = pair / "sft", pair / "sft+dpo", pair / "ref_logps.pt"
    limits = ("--max-examples", "64")
    sft(tiny_model, synthetic_data, sft_out, "--max-steps", "3", "--wandb", "--eval-every", "2")
    run_halos("ref-logps", "--model", sft_model, "--data", synthetic_data, "--out", ref, *FAST,
              *limits)
    run_halos("align", "--loss", "dpo", "--beta", "0.2", "--model", sft_model, "--data",
              synthetic_data, "--ref-logps", ref, "--out", dpo_out, *FAST, *limits,
              "--learning-rate", "1e-4", "--max-steps", "3", "--wandb", "--wandb-project", "obs")

    for out, loss, project in ((sft_out, "sft", "halos"), (dpo_out, "dpo", "obs")):
        records = wandb_records(out)
        assert_history_matches_metrics(out, wandb_history(records))
        run = run_record(records)
        assert (run["display_name"], run["run_group"], run["project"]) == (
            out.name, "obs/tiny-1m/synthetic", project)
        config = run["config"]["update"]
        assert (config["loss"], config["max_steps"], config["micro_batch_size"]) == (loss, 3, 8)
        assert config["learning_rate"] == (3e-3 if loss == "sft" else 1e-4)
        assert config["data"] == str(synthetic_data)
        assert_no_secret_under(out)
    assert run_record(wandb_records(dpo_out))["config"]["update"]["loss_params"] == {"beta": 0.2}


def test_wandb_offline_online_ppo_logs_trl_named_metrics(
        offline_wandb, sft_model: Path, synthetic_data: Path, tmp_path: Path) -> None:
    reward, out = tmp_path / "rm", tmp_path / "results" / "obs" / "tiny-1m" / "synthetic" / "ppo"
    run_halos("align", "--loss", "rm", "--model", sft_model, "--data", synthetic_data, "--out",
              reward, *FAST, "--max-steps", "2", "--learning-rate", "3e-4")
    run_halos("ppo", "--model", sft_model, "--reward-model", reward / "model", "--data",
              synthetic_data, "--out", out, "--deepspeed", "zero0", "--no-progress",
              "--max-length", "64", "--max-prompt-length", "32", "--micro-batch-size", "8",
              "--response-length", "8", "--max-steps", "2", "--num-ppo-epochs", "1",
              "--num-sample-generations", "1", "--kl-coef", "0.07", "--wandb")
    records = wandb_records(out)
    history = wandb_history(records)
    assert_history_matches_metrics(out, history)
    for name in TRL_PPO_METRICS:
        assert all(f"train/{name}" in history[step] for step in (1, 2)), name
    config = run_record(records)["config"]["update"]
    assert (config["loss"], config["kl_coef"], config["response_length"]) == (
        "online_ppo", 0.07, 8)
    assert_no_secret_under(out)
