"""The Snakemake DAG: planning, lint, bad tables, rerun triggers — with `snakemake -n` and with a
fake `halos` on PATH (tests/fake_halos.py) so that jobs really run, in milliseconds."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "Snakefile"
MICRO = REPO / "tests" / "suites" / "micro.yaml"


def snakemake(workdir: Path, *args: str, env: dict | None = None, check: bool = True,
              timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory",
               str(workdir), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=env or dict(os.environ), cwd=workdir)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def planned_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a `snakemake -n` printed."""
    jobs, rule = [], None
    for line in output.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line.strip()):
            rule = m.group(1)
            jobs.append((rule, {}))
        elif rule and line.strip().startswith("wildcards:"):
            pairs = line.strip()[len("wildcards:"):].split(", ")
            jobs[-1][1].update(p.strip().split("=", 1) for p in pairs)
    return jobs


def dry_run(workdir: Path, *args: str, **kw) -> list[tuple[str, dict[str, str]]]:
    result = snakemake(workdir, "-n", *args, **kw)
    return planned_jobs(result.stdout + result.stderr)


def count(jobs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rule, _ in jobs:
        counts[rule] = counts.get(rule, 0) + 1
    return counts


# --- planning -------------------------------------------------------------------------------

def test_archangel_plans_every_job_in_seconds(tmp_path: Path):
    start = time.monotonic()
    jobs = dry_run(tmp_path, "--config", "suite=" + str(REPO / "configs/suites/archangel.yaml"))
    elapsed = time.monotonic() - start
    n = count(jobs)
    # 7 models x (sft + csft/dpo/kto/ppo/slic on base + on SFT) on the SHP+HH+OASST1 mix.
    assert n["prepare_data"] == 3 and n["mix_data"] == 1
    assert n["sft"] == 7 and n["ref_logps"] == 7 and n["ref_logps_base"] == 7
    assert n["align"] == 7 * 10 and n["report"] == 1
    assert "tiny_model" not in n  # Hub models
    # Every policy (sft + 10 aligned) is scored on pairs, sampled and run through lm-eval in
    # one evaluate job; the 10 are judged; no reward model, so no eval_preference job.
    assert n["evaluate"] == 7 * 11 and n["eval_judge"] == 7 * 10 and "eval_preference" not in n
    print(f"archangel: {len(jobs)} jobs planned in {elapsed:.1f} s")
    assert elapsed < 120  # seconds on an idle machine; generous for shared CI cores


def test_tiny_suite_plans_every_stage(tmp_path: Path):
    n = count(dry_run(tmp_path))
    assert n["prepare_data"] == 1 and n["tiny_model"] == 2 and n["sft"] == 2
    # 24 aligned policies (one a LoRA row) + 2 reward models (class rm), by `halos align`.
    assert n["ref_logps"] == 2 and n["align"] == 24 + 2 and "reward_model" not in n
    assert n["ppo"] == 2  # online PPO against each model's reward model
    # Each policy's evals (pairs, samples, the local lm-eval tasks) are one evaluate job; the
    # 2 reward models are only scored on pairs.
    assert n["evaluate"] == 28 and n["eval_judge"] == 26 and n["eval_preference"] == 2


def test_lint_is_clean_but_for_conda():
    """The one lint left is "specify a conda environment or container": every rule runs the
    project's own `halos` from the installed environment (scripts/install.sh)."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--lint"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    lints = {line.strip() for line in (result.stdout + result.stderr).splitlines()
             if line.strip().startswith("* ")}
    assert lints <= {"* Specify a conda environment or container for each rule.:"}, lints


def test_slurm_profile_resolves_from_the_repo_root():
    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["slurm-status-command"] == "squeue"
    result = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "-n"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule align:" in result.stdout


def test_bad_table_row_is_refused_before_any_job(tmp_path: Path):
    tables = tmp_path / "configs"
    shutil.copytree(REPO / "configs", tables, ignore=shutil.ignore_patterns("deepspeed"))
    losses = tables / "losses" / "tiny.yaml"
    losses.write_text(losses.read_text().replace("class: kto, params: {beta: 0.1}",
                                                 "class: kto, params: {beta: 0.1}, warmup: 3"))
    result = snakemake(tmp_path, "-n", "--config", f"suite={tables}/suites/tiny.yaml",
                       check=False)
    assert result.returncode != 0
    assert re.search(r"losses table .*tiny\.yaml, row 'sft\+kto'.*warmup", result.stdout + result.stderr, re.S), \
        result.stderr[-3000:]
    assert not (tmp_path / "data").exists()


# --- real runs of the DAG with a fake `halos` -------------------------------------------------

@pytest.fixture
def fake_env(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    halos = bin_dir / "halos"
    halos.write_text(f"#!{sys.executable}\n" + (REPO / "tests" / "fake_halos.py").read_text())
    halos.chmod(halos.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
                FAKE_HALOS_LOG=str(tmp_path / "calls.log"))


def micro_copy(tmp_path: Path) -> Path:
    """The micro suite with its losses table copied, so a test may edit a row."""
    suite_dir = tmp_path / "suite"
    suite_dir.mkdir()
    for name in ("micro-losses.yaml", "micro-datasets.yaml"):
        shutil.copy(MICRO.parent / name, suite_dir / name)
    spec = yaml.safe_load(MICRO.read_text())
    spec["tables"]["models"] = str(REPO / "configs" / "models.yaml")
    (suite_dir / "micro.yaml").write_text(yaml.safe_dump(spec))
    return suite_dir / "micro.yaml"


def test_rerun_nothing_then_one_row_edit_reruns_only_its_jobs(tmp_path: Path, fake_env: dict):
    work = tmp_path / "work"
    work.mkdir()
    suite = micro_copy(tmp_path)
    config = ("--config", f"suite={suite}")
    snakemake(work, "--cores", "2", *config, env=fake_env)
    assert (work / "results" / "micro" / "leaderboard.md").is_file()
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert any(c.startswith("align --loss dpo") and "--beta 0.1" in c for c in calls)

    # Nothing to do on a second run.
    assert dry_run(work, *config, env=fake_env) == []

    # Edit one hyperparameter of one loss row: exactly its alignment, its evals and the report.
    losses = suite.parent / "micro-losses.yaml"
    table = yaml.safe_load(losses.read_text())
    table["sft+dpo"]["params"]["beta"] = 0.3
    losses.write_text(yaml.safe_dump(table))
    jobs = dry_run(work, *config, env=fake_env)
    assert sorted(rule for rule, _ in jobs) == sorted(
        ["align", "evaluate", "eval_judge", "report", "all"])
    assert all(w.get("loss", "sft+dpo") == "sft+dpo" for _, w in jobs)

    snakemake(work, "--cores", "2", *config, env=fake_env)
    assert "--beta 0.3" in (tmp_path / "calls.log").read_text().splitlines()[-8:][0] or any(
        "--beta 0.3" in c for c in (tmp_path / "calls.log").read_text().splitlines())
    assert dry_run(work, *config, env=fake_env) == []

    # Editing the SFT row reruns everything downstream of SFT, not the data or the base model.
    table["sft"]["learning_rate"] = 1e-3
    losses.write_text(yaml.safe_dump(table))
    n = count(dry_run(work, *config, env=fake_env))
    assert n["sft"] == 1 and n["ref_logps"] == 1 and n["align"] == 2
    assert "prepare_data" not in n and "tiny_model" not in n


@pytest.mark.parametrize("signal", [15, 9])
def test_killed_run_is_finished_by_rerunning(tmp_path: Path, fake_env: dict, signal: int):
    """Kill snakemake and its jobs midway (SIGTERM, or SIGKILL then `snakemake --unlock`, as
    Snakemake asks): the rerun redoes the incomplete job (profiles/default sets
    rerun-incomplete) and only the jobs not yet done."""
    work = tmp_path / "work"
    work.mkdir()
    config = ("--config", f"suite={MICRO}")
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(work),
               "--cores", "1", *config]
    calls = tmp_path / "calls.log"
    proc = subprocess.Popen(command, env=dict(fake_env, FAKE_HALOS_HANG="align --loss dpo"),
                            cwd=work, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (calls.is_file() and "align --loss dpo" in calls.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "dpo job never started"
        time.sleep(0.5)
    os.killpg(proc.pid, signal)
    proc.wait(timeout=120)
    if signal == 9:  # no chance to clean up: the lock stays until --unlock
        snakemake(work, "--unlock", *config, env=fake_env)
    before = calls.read_text().splitlines()
    assert not (work / "results/micro/leaderboard.md").exists()

    result = snakemake(work, "--cores", "2", *config, env=fake_env)
    assert (work / "results/micro/leaderboard.md").is_file(), result.stderr[-3000:]
    rerun = calls.read_text().splitlines()[len(before):]
    assert any(c.startswith("align --loss dpo") for c in rerun)
    assert not any(c.startswith(("sft", "tiny-model", "data prepare")) for c in rerun)
    assert dry_run(work, *config, env=fake_env) == []
