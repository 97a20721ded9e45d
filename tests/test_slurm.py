"""`snakemake --profile slurm` against a live one-node Slurm cluster (scripts/slurm-up.sh).

Each run is the README's command, typed from the repo root, plus only test settings on the command
line: `--directory` (a temp workdir, so nothing is written into the repo), `--config suite=...`
(test-only suites in tests/suites/slurm*.yaml) and a short first status check. The suites train
the built-in tiny-1m as 2 processes with ZeRO-3 (`processes: 2`, torchrun inside the job).

- the slice: data, tiny model, sft, ref-logps, dpo, samples, judge and preference evals, the
  leaderboard; every training job ran with world_size 2;
- preemption and cancellation: the dpo job is requeued (`scontrol requeue`, as a preempting site
  does) and resumes in the same run, then cancelled (`scancel`): snakemake exits non-zero, the
  same command run again resumes from the last checkpoint and the suite finishes;
- a failing job: snakemake names the job's logs and exits non-zero within a bounded time;
- with accounting (slurmdbd + MariaDB): the plugin's default `sacct` status, and the partition
  and account from the user's settings; the cluster is put back without accounting afterwards.

Root and apt (CI: a fresh Debian machine) are needed to start the cluster; elsewhere these tests
skip with the reason.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import halos.suite as hs

REPO = Path(__file__).resolve().parent.parent
SUITES = REPO / "tests" / "suites"
SLICE, RESUME, FAIL = (SUITES / f"{n}.yaml" for n in ("slurm", "slurm-resume", "slurm-fail"))
MODEL = "tiny-1m-zero3x2"
PARTITION = os.environ.get("HALOS_SLURM_PARTITION", "ci")
FIRST_CHECK_S = 3  # --slurm-init-seconds-before-status-checks (MinJobAge 300 >= 3 x this)


# --------------------------------------------------------------------------- unit (no cluster)

@pytest.mark.parametrize("nodes,procs", [(1, 1), (1, 2), (2, 4)])
def test_launch_command(nodes, procs):
    command = hs.launch_command(nodes, procs, threads=8)
    if procs == 1 and nodes == 1:
        assert command == "env OMP_NUM_THREADS=8 halos"
    elif nodes == 1:
        assert command == (f"env OMP_NUM_THREADS={8 // procs} torchrun --standalone "
                           f"--nproc_per_node {procs} -m halos")
    else:  # one torchrun per node, c10d rendezvous on the first host, port from the job id
        assert command.startswith(f"env -u SLURM_JOB_NODELIST OMP_NUM_THREADS=2 srun --overlap "
                                  f"--nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 bash -c ")
        assert f"exec torchrun --nnodes {nodes} --nproc_per_node {procs}" in command
        assert "--rdzv_backend c10d --rdzv_id $SLURM_JOB_ID" in command
        assert ('endpoint=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):'
                "$((29500 + SLURM_JOB_ID % 10000))") in command
        assert command.endswith(" halos-node -m halos")


def test_processes_column_sets_world_size_launcher_and_cpus():
    suite = hs.load_suite(SLICE)
    assert hs.processes(suite, MODEL) == 2 and hs.world_size(suite, MODEL) == 2
    assert hs.launcher(suite, MODEL, 2) == (
        "env OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m halos")
    assert hs.launcher(suite, MODEL, 2, distributed=False) == "env OMP_NUM_THREADS=2 halos"
    res = hs.resources(suite, MODEL, "train")
    assert res["cpus_per_task"] == 2 and res["tasks"] == 1 and res["nodes"] == 1
    assert res["gres"] == "" and res["mem_mb"] == 3000 and res["runtime"] == 10
    archangel = hs.load_suite(REPO / "configs/suites/archangel.yaml")
    assert hs.processes(archangel, "llama-30b") == 8 and hs.world_size(archangel, "llama-30b") == 32
    gpu = hs.resources(archangel, "llama-30b", "train")  # GPU rows: no --ntasks-per-gpu
    assert gpu["tasks"] is None and gpu["gres"] == "gpu:8" and gpu["nodes"] == 4


# --------------------------------------------------------------------------- the cluster

def need_root_and_apt() -> None:
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster needs root (scripts/slurm-up.sh installs and starts daemons)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("no Slurm and no apt-get to install it (scripts/slurm-up.sh is for Debian)")


def slurm_up(accounting: bool = False) -> float:
    start = time.monotonic()
    env = dict(os.environ, HALOS_SLURM_ACCOUNTING="1" if accounting else "0",
               HALOS_SLURM_PARTITION=PARTITION)
    result = subprocess.run(["bash", str(REPO / "scripts/slurm-up.sh")], env=env, text=True,
                            capture_output=True, timeout=900)
    assert result.returncode == 0, f"slurm-up.sh failed:\n{result.stdout}\n{result.stderr}"
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster():
    need_root_and_apt()
    print(f"slurm-up: {slurm_up():.1f} s")


def env() -> dict:
    """Jobs inherit it (sbatch --export=ALL): the venv's `halos`/`torchrun` on PATH, offline."""
    bin_dir = str(Path(sys.executable).parent)
    out = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(var, None)
    return out


def profile_command(work: Path, suite: Path, *extra: str) -> list[str]:
    """`snakemake --profile slurm` from the repo root, with only test settings added."""
    return [sys.executable, "-m", "snakemake", "--profile", "slurm", "--directory", str(work),
            "--config", f"suite={suite}",
            "--slurm-init-seconds-before-status-checks", str(FIRST_CHECK_S), *extra]


def run_profile(work: Path, suite: Path, *extra: str, timeout: int = 900):
    start = time.monotonic()
    result = subprocess.run(profile_command(work, suite, *extra), cwd=REPO, env=env(), text=True,
                            capture_output=True, timeout=timeout)
    return result, time.monotonic() - start


def failure(result) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"


def leaderboard(work: Path, suite: str = "slurm") -> dict[str, dict]:
    with open(work / "results" / suite / "leaderboard.csv") as handle:
        return {row["loss"]: row for row in csv.DictReader(handle)}


def number(value: str) -> float:
    return float(value)  # raises on an empty cell


def training_info(work: Path, loss: str, suite: str = "slurm") -> dict:
    return json.loads((work / f"results/{suite}/{MODEL}/synthetic/{loss}/model/halos_training.json")
                      .read_text())


def slurm_job(comment: str) -> str | None:
    """The Slurm id of this run's job for a rule + wildcards (the plugin names every job of a run
    by the run's uuid and puts `rule_RULE_wildcards_WILDCARDS` in the comment)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        jobid, job_comment, state = line.split("|")
        if job_comment == comment and state in ("RUNNING", "PENDING", "CONFIGURING"):
            return jobid
    return None


def assert_clean_repo():
    """Runs with --directory write nothing into the repo (no results/, logs/, .snakemake/)."""
    for name in ("results", "logs", "data", "models"):
        assert not (REPO / name).exists(), f"a test run wrote {REPO / name}"


# --------------------------------------------------------------------------- the slice

@pytest.fixture(scope="module")
def slice_run(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-slice")
    result, elapsed = run_profile(work, SLICE)
    print(f"slurm slice: {elapsed:.0f} s")
    return work, result, elapsed


@pytest.mark.slow
def test_slice_through_slurm_with_a_two_process_zero3_model(slice_run):
    work, result, elapsed = slice_run
    assert result.returncode == 0, failure(result)
    output = result.stdout + result.stderr
    assert "has been submitted with SLURM jobid" in output
    assert "torchrun --standalone --nproc_per_node 2 -m halos sft" in output
    assert "torchrun --standalone --nproc_per_node 2 -m halos align --loss dpo" in output
    rows = leaderboard(work)
    assert set(rows) == {"sft", "sft+dpo"} and {r["model"] for r in rows.values()} == {MODEL}
    for row in rows.values():
        number(row["logp_accuracy"]), number(row["logp_margin"])
    dpo = rows["sft+dpo"]
    for column in ("win_rate", "judge_score", "reward_accuracy", "reward_margin"):
        number(dpo[column])
    assert int(dpo["n"]) == 16
    for loss in ("sft", "sft+dpo"):
        info = training_info(work, loss)
        assert info["world_size"] == 2, info
    assert (work / "results/slurm/leaderboard.md").read_text().count(MODEL) >= 2
    # Slurm's own job logs go to logs/slurm/ in the workdir (deleted for successful jobs).
    assert f"(log: {work}/logs/slurm/rule_align/{MODEL}_synthetic_sft+dpo/" in output
    assert_clean_repo()
    again, _ = run_profile(work, SLICE, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_multinode_launch_path_on_one_node(slice_run, tmp_path):
    """The multi-node command (srun --overlap, one torchrun per node, c10d rendezvous on the
    first host at a port from the job id), nested in a job step as the plugin runs a rule's
    shell, on the one node there is: 2 processes train with ZeRO-3."""
    work = slice_run[0]
    command = hs.launch_command(1, 2, 2, multinode=True)
    out = tmp_path / "multinode"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"cd {work}\n"
        "srun -n1 --cpus-per-task=2 --nodes=1 bash -c " + shlex.quote(
            f"{command} sft --model models/{MODEL} --data data/synthetic --out {out} "
            "--deepspeed zero3 --precision fp32 --no-progress --micro-batch-size 8 "
            "--max-steps 2 --max-length 64 --max-prompt-length 32 --eval-examples 0") + "\n")
    start = time.monotonic()
    result = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks=1", "--cpus-per-task=2",
                             "--mem=3000", "-t", "10", "-o", str(tmp_path / "slurm-%j.log"),
                             str(script)], env=env(), capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.log"))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{logs[-6000:]}"
    info = json.loads((out / "model" / "halos_training.json").read_text())
    assert info["world_size"] == 2, info
    print(f"multi-node path on one node: {time.monotonic() - start:.0f} s")


# --------------------------------------------------------------------------- requeue, scancel

def wait_for(what: str, condition, proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"snakemake ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def latest_step(checkpoints: Path) -> int:
    try:
        return int((checkpoints / "latest").read_text().strip().rsplit("_", 1)[-1])
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_requeued_and_cancelled_training_job_resumes_from_its_checkpoint(slice_run, tmp_path):
    """Preemption (`scontrol requeue`): Slurm reruns the batch job and training resumes in the
    same snakemake run. `scancel`: the job fails, snakemake exits non-zero; running the same
    command again resumes from the last checkpoint and the suite finishes."""
    work = tmp_path / "work"
    shutil.copytree(slice_run[0], work, symlinks=True)  # data, tiny model, sft, ref-logps done
    run_dir = work / f"results/slurm-resume/{MODEL}/synthetic/sft+dpo-resume"
    checkpoints, log = run_dir / "checkpoints", work / f"logs/slurm-resume/align/{MODEL}/synthetic/sft+dpo-resume.log"
    comment = f"rule_align_wildcards_{MODEL}_synthetic_sft+dpo-resume"
    # --retries 0: a cancelled job fails the run (the profile's `retries: 1` would resubmit it).
    command = profile_command(work, RESUME, "--retries", "0")
    out_path = tmp_path / "first.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        jobid = wait_for("the dpo job's first checkpoint",
                         lambda: latest_step(checkpoints) and slurm_job(comment), proc, 600)
        first = latest_step(checkpoints)
        subprocess.run(["scontrol", "requeue", jobid], check=True)
        # A requeued job waits for its BeginTime; start it now as the freed node would.
        wait_for("the requeue", lambda: slurm_job(comment) == jobid and "PENDING" in subprocess.run(
            ["squeue", "-h", "-j", jobid, "-o", "%T"], capture_output=True, text=True).stdout,
            proc, 60)
        subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], check=True)
        wait_for("the requeued job to resume", lambda: log.is_file() and "resumed from" in
                 log.read_text(), proc, 300)
        requeued_log = log.read_text()
        assert f"step_{first}" in requeued_log.split("resumed from", 1)[1].splitlines()[0], \
            requeued_log[-2000:]
        second = wait_for("a checkpoint after the requeue",
                          lambda: latest_step(checkpoints) > first and latest_step(checkpoints),
                          proc, 300)
        assert not (run_dir / "model").exists(), "cancel before the end of training"
        cancelled = time.monotonic()
        subprocess.run(["scancel", jobid], check=True)
        proc.wait(timeout=300)
        exit_s = time.monotonic() - cancelled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    output = out_path.read_text()
    print(f"requeue at step {first}, scancel at step >= {second}; snakemake exited "
          f"{exit_s:.0f} s after scancel")
    assert proc.returncode != 0, output[-3000:]
    assert "CANCELLED" in output and str(log.relative_to(work)) in output, output[-3000:]
    assert exit_s < 180
    assert checkpoints.is_dir() and not (run_dir / "model").exists()

    result, elapsed = run_profile(work, RESUME, "--retries", "0")
    assert result.returncode == 0, failure(result)
    text = log.read_text()
    step = latest_step_from(text)
    assert step >= second, text[-2000:]
    print(f"rerun resumed from step {step}, finished in {elapsed:.0f} s")
    assert training_info(work, "sft+dpo-resume", "slurm-resume")["world_size"] == 2
    rows = leaderboard(work, "slurm-resume")
    assert {"sft", "sft+dpo-resume"} <= set(rows)
    number(rows["sft+dpo-resume"]["win_rate"]), number(rows["sft+dpo-resume"]["logp_accuracy"])
    assert not checkpoints.exists(), "a finished run removes its checkpoints"


def latest_step_from(log_text: str) -> int:
    """`[halos] resumed from .../checkpoints/step_N at step N` -> N."""
    assert "resumed from" in log_text, log_text[-2000:]
    line = log_text.split("resumed from", 1)[1].splitlines()[0]
    return int(line.rsplit("at step", 1)[1].strip())


# --------------------------------------------------------------------------- failures

def _check_failure(result, elapsed: float, work: Path, limit_s: float = 180) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < limit_s, f"snakemake took {elapsed:.0f} s to report a failing job"
    assert "Error in rule prepare_data" in output, output[-3000:]
    assert "logs/slurm-fail/prepare_data/missing.log" in output, output[-3000:]  # the halos log
    slurm_logs = list((work / "logs/slurm/rule_prepare_data").rglob("*.log"))
    assert slurm_logs and any(str(p) in output for p in slurm_logs), output[-3000:]
    assert "no such file or folder: /nonexistent/halos-missing.jsonl" in output  # show-failed-logs
    return output


@pytest.mark.slow
def test_failing_job_is_reported_with_its_log_and_snakemake_exits_nonzero(cluster, tmp_path):
    result, elapsed = run_profile(tmp_path, FAIL, timeout=600)
    output = _check_failure(result, elapsed, tmp_path)
    # retries: 1 in the profile: the job was submitted twice before snakemake gave up.
    assert output.count("has been submitted with SLURM jobid") == 2, output[-3000:]
    print(f"failing job reported, snakemake exited {result.returncode} after {elapsed:.0f} s")


# --------------------------------------------------------------------------- accounting

@pytest.mark.slow
def test_with_accounting_sacct_status_partition_and_account(cluster, tmp_path):
    """A site with slurmdbd + MariaDB: the plugin's default status command (sacct), the
    partition and account given as the user would (default resources). Restores the cluster
    without accounting afterwards, as the other tests expect."""
    try:
        print(f"slurm-up with accounting: {slurm_up(accounting=True):.1f} s")
        account = ("--default-resources", f"slurm_partition={PARTITION}", "slurm_account=halos",
                   "mem_mb=1000", "runtime=10", "cpus_per_task=1")
        work = tmp_path / "ok"
        result, elapsed = run_profile(work, SLICE, *account, "--slurm-status-command", "sacct",
                                      "data/synthetic", timeout=600)
        assert result.returncode == 0, failure(result)
        assert (work / "data/synthetic/train.jsonl").is_file()
        print(f"one job with sacct status: {elapsed:.0f} s")
        jobs = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Account,Partition,State",
                               "-S", "now-3600"], capture_output=True, text=True, check=True)
        assert f"|halos|{PARTITION}|COMPLETED" in jobs.stdout, jobs.stdout

        work = tmp_path / "fail"
        result, elapsed = run_profile(work, FAIL, *account, "--slurm-status-command", "sacct",
                                      timeout=600)
        output = _check_failure(result, elapsed, work)
        assert "SLURM status is: 'FAILED'" in output
        print(f"failing job with sacct status reported after {elapsed:.0f} s")
    finally:
        slurm_up(accounting=False)
