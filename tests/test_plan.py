"""`halos plan`: token counts against real training, the FLOPs formula, DeepSpeed's memory
estimator, rows that do not fit, Slurm resources from the plan, and the leaderboard's measured
cost beside the plan."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import halos_env, run_halos

import halos.suite as hs
from halos.plan import memory as mem
from halos.plan.arch import model_arch
from halos.plan.flops import job_flops, wall_hours
from halos.plan.jobs import Options, Planner, fitting_change
from halos.plan.tokens import Tokens

REPO = Path(__file__).resolve().parents[1]
ARCHANGEL = REPO / "configs" / "suites" / "archangel.yaml"
# One tiny model x SFT, a paired loss without reference (orpo) and KTO (unpaired, mismatched KL
# pairs, reference log-probs of the base model): a few real steps each.
LOSSES = {
    "sft": {"class": "sft", "batch_size": 16, "learning_rate": 1e-3, "max_steps": 3},
    "orpo": {"class": "orpo", "batch_size": 16, "learning_rate": 1e-4, "max_steps": 3},
    "kto": {"class": "kto", "batch_size": 16, "learning_rate": 1e-4, "max_steps": 2},
}
DATASETS = {"synthetic": {"loader": "synthetic", "source": "synthetic", "max_length": 64,
                          "max_prompt_length": 32, "eval_examples": 0,
                          "options": {"n_train": 1200}}}


def write_suite(folder: Path, models: str | Path = REPO / "configs" / "models.yaml",
                model: str = "tiny-1m", losses: dict = LOSSES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "losses.yaml").write_text(yaml.safe_dump(losses))
    (folder / "datasets.yaml").write_text(yaml.safe_dump(DATASETS))
    spec = {"name": "plantest", "models": [model], "datasets": ["synthetic"], "losses": "all",
            "tables": {"models": str(models), "losses": "losses.yaml",
                       "datasets": "datasets.yaml"},
            "eval": {"preference": True, "preference_examples": 16}}
    (folder / "suite.yaml").write_text(yaml.safe_dump(spec))
    return folder / "suite.yaml"


@pytest.fixture(scope="module")
def trained(tiny_model: Path, synthetic_data: Path, tmp_path_factory) -> dict:
    """A work folder (data/, models/ as the DAG lays them out) where the suite's training jobs
    ran for real with the arguments the rules pass, each timed."""
    work = tmp_path_factory.mktemp("plan-work")
    (work / "data").mkdir()
    (work / "data" / "synthetic").symlink_to(synthetic_data)
    (work / "models").mkdir()
    (work / "models" / "tiny-1m").symlink_to(tiny_model)
    suite_file = write_suite(work / "suite")
    suite = hs.load_suite(suite_file)
    jobs = [("sft", "sft", hs.sft_args(suite, "tiny-1m", "synthetic")),
            ("orpo", "align", hs.align_args(suite, "tiny-1m", "synthetic", "orpo")),
            (None, "ref-logps", hs.ref_args(suite, "tiny-1m", "synthetic", base=True)),
            ("kto", "align", hs.align_args(suite, "tiny-1m", "synthetic", "kto"))]
    with contextlib.chdir(work):
        seconds = run_together(jobs[:3])  # independent: side by side on the two cores
        seconds.update(run_together(jobs[3:]))  # kto reads the reference file
    return {"work": work, "suite": suite_file, "seconds": seconds}


def run_together(jobs: list[tuple]) -> dict:
    """Run `halos COMMAND ARGS` jobs at once; {loss: wall seconds of its process}."""
    started, logs = time.perf_counter(), {}
    procs = {}
    for loss, command, args in jobs:
        logs[loss] = Path(f"{command}-{loss}.log").open("w")
        procs[loss] = subprocess.Popen([sys.executable, "-m", "halos", command,
                                        *shlex.split(args)], stdout=logs[loss],
                                       stderr=subprocess.STDOUT, env=halos_env())
    seconds: dict = {}
    while len(seconds) < len(procs):
        for loss, proc in procs.items():
            if loss not in seconds and proc.poll() is not None:
                seconds[loss] = time.perf_counter() - started
                logs[loss].close()
                assert proc.returncode == 0, Path(logs[loss].name).read_text()[-4000:]
        time.sleep(0.1)
    return seconds


def logged_tokens(run: Path) -> int:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r["tokens"] for r in rows if r["split"] == "train")


def test_plan_counts_exactly_the_tokens_training_logs(trained):
    with contextlib.chdir(trained["work"]):
        suite = hs.load_suite(trained["suite"])
        rows = {(r.rule, r.loss): r for r in Planner(suite).plan()}
        for rule, loss in (("sft", "sft"), ("align", "orpo"), ("align", "kto")):
            row = rows[(rule, loss)]
            run = Path(suite.run_dir(hs.Run("tiny-1m", "synthetic", loss)))
            assert row.tokens.source == "counted"
            assert row.tokens.steps == LOSSES[loss]["max_steps"]
            assert row.tokens.trained + row.tokens.scored == logged_tokens(run), loss
        assert rows[("align", "kto")].tokens.scored > 0  # KTO's KL pairs: scored, not trained
        assert rows[("align", "orpo")].tokens.scored == 0


def test_the_plan_modules_snakemake_imports_load_no_torch():
    code = ("import sys, halos.suite, halos.plan.jobs, halos.plan.slurm, halos.plan.measured, "
            "halos.plan.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'deepspeed')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_flops_formula_on_a_hand_example():
    tokens = Tokens(trained=1000, scored=400, generated=100)
    # 6 * 1e9 * 1000 + 2 * 1e9 * (400 + 100)
    assert job_flops(10**9, tokens) == 7.0e12
    assert job_flops(10**9, tokens, activation_checkpointing=True) == 9.0e12  # 8N: forward twice
    # 7e12 FLOPs on 2 devices of 1e12 FLOP/s at 50%: 7 s.
    assert wall_hours(7.0e12, 1e12, devices=2, mfu=0.5) == pytest.approx(7 / 3600)


def _deepspeed_table(total: int, largest: int, gpus: int, nodes: int) -> dict[tuple, float]:
    """DeepSpeed's printed ZeRO-3 table: {(offload_param, offload_optimizer, zero_init): GB
    per GPU}."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero3_model_states_mem_needs_all_cold(total_params=total,
                                                       largest_layer_params=largest,
                                                       num_gpus_per_node=gpus, num_nodes=nodes)
    table = {}
    for line in out.getvalue().splitlines():
        match = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", line)
        if match:
            options = dict(o.strip().split("=") for o in match.group(3).split(","))
            key = (options["offload_param"] != "none", options["offload_optimizer"] != "none",
                   options["zero_init"] == "1")
            table[key] = float(match.group(2))
    return table


def test_memory_of_the_llama_7b_row_is_deepspeeds_estimate():
    suite = hs.load_suite(ARCHANGEL)
    row = next(r for r in Planner(suite, Options(count=False)).plan()
               if (r.model, r.loss, r.rule) == ("llama-7b", "sft", "sft"))
    arch = model_arch("llama-7b", suite.models["llama-7b"])
    assert (arch.params, arch.largest_layer_params) == (7 * 10**9, 32000 * 4096)
    table = _deepspeed_table(arch.params, arch.largest_layer_params, gpus=8, nodes=1)
    expected = table[(False, False, True)]  # halos loads ZeRO-3 models under zero.Init
    assert round(row.memory.model_states / 2**30, 2) == expected
    assert row.fits and row.memory.per_gpu < 80 * 2**30
    # Offloading optimizer and parameters leaves the largest layer on the GPU: DeepSpeed's row.
    offload = mem.estimate(arch, mem.Setup("zero3_offload", 8, 1, 4, 1, 512, False, 1024))
    assert round(offload.model_states / 2**30, 2) == table[(True, True, True)]


def test_a_row_that_cannot_fit_is_flagged_with_the_change_that_fits(tmp_path: Path):
    models = yaml.safe_load((REPO / "configs" / "models.yaml").read_text())
    big = {**models["llama-30b"], "nodes": 1, "deepspeed": "zero2", "micro_batch_size": 8,
           "train": {}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"llama-30b": big}))
    suite = hs.load_suite(write_suite(tmp_path, tmp_path / "models.yaml", "llama-30b"))
    rows = [r for r in Planner(suite, Options(count=False)).plan() if r.memory is not None]
    assert rows and not any(r.fits for r in rows)
    for row in rows:
        change, gb = re.fullmatch(r"(.+) → ([\d.]+) GB", row.fix).groups()
        assert float(gb) <= 80
    # 30B at ZeRO-2 on 8 GPUs: the model states alone exceed 80 GB, whatever the activations.
    assert all(r.fix.startswith("deepspeed: zero3 → ") for r in rows)
    # Where the activations are what does not fit, activation checkpointing is the fix.
    arch = model_arch("llama-7b", yaml.safe_load((REPO / "configs/models.yaml").read_text())[
        "llama-7b"])
    long = mem.Setup("zero3", 8, 1, micro_batch=16, sequences_per_example=2, max_length=4096,
                     activation_checkpointing=False, logits_chunk=1024)
    assert mem.estimate(arch, long).per_gpu > 80 * 2**30
    fix = fitting_change(arch, long, 80 * 2**30)
    assert fix.startswith("train: {activation_checkpointing: true} → ")
    ckpt = mem.estimate(arch, long.but(activation_checkpointing=True))
    assert fix.endswith(f"{ckpt.per_gpu / 2**30:.1f} GB") and ckpt.per_gpu <= 80 * 2**30
    result = run_halos("plan", suite.path, "--estimate", "--require-fit", check=False)
    assert result.returncode == 2
    assert "--require-fit" in result.stderr and "llama-30b/synthetic/sft" in result.stderr
    assert "**no**: deepspeed: zero3 → " in result.stdout


def test_slurm_resources_of_a_row_without_runtime_and_mem_mb_come_from_the_plan(tmp_path):
    from halos.plan.slurm import SAFETY_FACTOR, STARTUP_MINUTES

    models = yaml.safe_load((REPO / "configs" / "models.yaml").read_text())
    row = {k: v for k, v in models["llama-7b"].items() if k not in ("runtime", "mem_mb")}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"llama-7b": row}))
    suite = hs.load_suite(write_suite(tmp_path, tmp_path / "models.yaml", "llama-7b"))
    planned = [r for r in Planner(suite, Options(count=False)).plan() if r.memory is not None]
    resources = hs.resources(suite, "llama-7b", "train")
    hours = max(r.hours for r in planned)
    assert resources["runtime"] == math.ceil(hours * 60 * SAFETY_FACTOR + STARTUP_MINUTES)
    assert resources["mem_mb"] > max(r.memory.cpu_per_node for r in planned) / 2**20
    assert hs.resources(suite, "llama-7b", "infer")["mem_mb"] == resources["mem_mb"]


def test_archangel_plan_and_its_readme_table(tmp_path: Path):
    result = run_halos("plan", ARCHANGEL, "--estimate", "--out", tmp_path / "plan.md")
    rows = list(csv.DictReader((tmp_path / "plan.csv").open()))
    train = [r for r in rows if r["rule"] in ("sft", "align", "ppo")]
    assert len(train) == 77 and all(r["fits"] == "yes" for r in train)
    total = result.stdout.split("| **suite total** |")[1].split("\n")[0]
    readme = (REPO / "README.md").read_text()
    assert f"| **suite total** |{total}" in readme, "README's archangel plan is out of date"


def test_leaderboard_shows_measured_cost_and_the_ratio_to_the_plan(trained):
    from snakemake.benchmark import BenchmarkRecord, write_benchmark_records

    work = trained["work"]
    with contextlib.chdir(work):
        run_halos("plan", trained["suite"], "--out", "results/plantest/plan.md")
        suite = hs.load_suite(trained["suite"])
        runs = [suite.run_dir(hs.Run("tiny-1m", "synthetic", loss)) for loss in ("sft", "orpo")]
        for loss, run in zip(("sft", "orpo"), runs, strict=True):
            rule, keys = ("sft", "tiny-1m/synthetic") if loss == "sft" else (
                "align", f"tiny-1m/synthetic/{loss}")
            peak = json.loads((Path(run) / "model/halos_training.json").read_text())["peak_memory"]
            record = BenchmarkRecord(running_time=trained["seconds"][loss], max_rss=peak[
                "max_rss_mb"], cpu_time=trained["seconds"][loss] * 0.9)
            record.data_collected = True
            tsv = Path(suite.layout.log(rule, keys, "benchmark.tsv"))
            tsv.parent.mkdir(parents=True, exist_ok=True)
            write_benchmark_records([record], str(tsv), extended_fmt=False)
            Path(run, "eval").mkdir(exist_ok=True)
            Path(run, "eval", "preference.json").write_text(json.dumps({"reward_accuracy": 0.5}))
        run_halos("report", "--runs", *runs, "--out", "results/plantest/leaderboard.md")
        board = Path("results/plantest/leaderboard.md").read_text()
        table = list(csv.DictReader(open("results/plantest/leaderboard.csv")))
        plan = {(r["rule"], r["loss"]): r for r in csv.DictReader(open("results/plantest/plan.csv"))}
    assert "## Cost: measured vs planned" in board and "**Suite total**: 2 jobs" in board
    for row in table:
        rule = "sft" if row["loss"] == "sft" else "align"
        planned = float(plan[(rule, row["loss"])]["wall_hours"]) * 3600
        measured = trained["seconds"][row["loss"]]
        assert float(row["train_s"]) == pytest.approx(measured, rel=1e-3)
        assert float(row["planned_train_s"]) == pytest.approx(planned, rel=1e-3)
        assert float(row["measured_vs_planned"]) == pytest.approx(measured / planned, rel=1e-3)
        assert float(row["train_max_rss_mb"]) > 100  # a torch process
        assert f"| {float(row['measured_vs_planned']):.2f} |" in board
    plot = work / "results/plantest/plots/cost_vs_plan.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "cost_vs_plan.png" in board
