"""`snakemake --profile slurm` on a live two-node Slurm cluster (scripts/slurm-two-nodes-up.sh):
two compute hosts in their own network namespaces (halos-n1, halos-n2), snakemake on the login
node (halos-head), the filesystem shared as on a site.

One run of the README's command (tests/suites/slurm-two-nodes.yaml: tiny-1m with ZeRO-3, one
process on each of two nodes) trains sft, then two dpo jobs at once; one of them loses its
second node's processes midway (SIGKILL, as when a node dies), fails, and snakemake's retry
resumes it from its last checkpoint. Checked afterwards:

- every training job ran with world size 2, one rank on each host (names and addresses logged);
- the two dpo jobs ran at the same time on the same nodes, each on its own rendezvous port;
- the dpo model equals the same job run as 2 processes on one node (same seed, world size);
- the killed job failed, was resubmitted and resumed from its checkpoint.

Needs root (namespaces, daemons) and Debian's packages; elsewhere it skips with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_slurm import FIRST_CHECK_S, env, failure, latest_step, need_root_and_apt

import halos.suite as hs

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "tests" / "suites" / "slurm-two-nodes.yaml"
MODEL, DATASET = "tiny-1m-zero3-2nodes", "synthetic"
HEAD = "halos-head"
NODES = {"halos-n1": "10.77.18.11", "halos-n2": "10.77.18.12"}
IFACE = "halos0"  # the interface of every namespace (GLOO_SOCKET_IFNAME, as a site would set)
KILLED = "sft+dpo-resume"  # the dpo job that loses its second node's processes


def test_a_two_node_row_trains_on_both_nodes_and_scores_references_on_one():
    """The launcher spans the job's allocation: training jobs get the row's nodes, ref-logps
    (`infer` resources) one node, so it must not start an srun over two."""
    suite = hs.load_suite(SUITE)
    train, infer = (hs.resources(suite, MODEL, stage) for stage in ("train", "infer"))
    assert (train["nodes"], train["tasks"], infer["nodes"]) == (2, 2, 1)
    assert hs.world_size(suite, MODEL) == 2
    assert hs.launcher(suite, MODEL, 1, nodes=train["nodes"]) == hs.launch_command(2, 1, 1)
    assert hs.launcher(suite, MODEL, 1, nodes=infer["nodes"]) == "env OMP_NUM_THREADS=1 halos"


def on_login_node(command: list[str]) -> list[str]:
    return ["ip", "netns", "exec", HEAD, *command]


def cluster_env() -> dict:
    return dict(env(), GLOO_SOCKET_IFNAME=IFACE)


@pytest.fixture(scope="module")
def two_nodes():
    need_root_and_apt()
    start = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "scripts/slurm-two-nodes-up.sh")], text=True,
                            capture_output=True, timeout=900)
    assert result.returncode == 0, f"slurm-two-nodes-up.sh failed:\n{result.stderr[-3000:]}"
    print(f"slurm-two-nodes-up: {time.monotonic() - start:.1f} s")


def run_dir(loss: str) -> Path:
    return Path("results") / SUITE.stem / MODEL / DATASET / loss


def log_file(work: Path, rule: str, loss: str | None = None) -> Path:
    name = f"{DATASET}/{loss}.log" if loss else f"{DATASET}.log"
    return work / "logs" / SUITE.stem / rule / MODEL / name


def running_align_jobs() -> set[str]:
    out = subprocess.run(on_login_node(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"]),
                         capture_output=True, text=True).stdout
    return {jobid for jobid, comment in (line.split("|", 1) for line in out.splitlines())
            if comment.startswith("rule_align_")}


def job_of(comment_end: str) -> str | None:
    out = subprocess.run(on_login_node(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"]),
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        jobid, comment = line.split("|", 1)
        if comment.endswith(comment_end):
            return jobid
    return None


def kill_on_node(node: str, jobid: str) -> list[int]:
    """SIGKILL this job's processes on one node (its torchrun and training process), found in
    the node's network namespace by their SLURM_JOB_ID: that node's part of the job dies."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True,
                          check=True).stdout.split()
    killed = []
    for pid in map(int, pids):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={jobid}".encode() in environ and b"halos" in cmdline \
                and b"snakemake" not in cmdline:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def _watch(proc: subprocess.Popen, work: Path) -> dict:
    """While snakemake runs: note when both dpo jobs run at once, and kill the second node's
    part of the KILLED job once it has saved a checkpoint."""
    seen: dict = {"together": set(), "killed_at_step": 0}
    checkpoints = work / run_dir(KILLED) / "checkpoints"
    started = time.monotonic()
    deadline = started + 600
    while proc.poll() is None and time.monotonic() < deadline:
        running = running_align_jobs()
        if len(running) == 2:
            seen["together"] = running
        jobid = job_of(f"_{KILLED}")
        if not seen["killed_at_step"] and jobid and latest_step(checkpoints):
            seen["killed_at_step"] = latest_step(checkpoints)
            seen["killed_after_s"] = round(time.monotonic() - started)
            seen["killed_job"], seen["killed_pids"] = jobid, kill_on_node("halos-n2", jobid)
        time.sleep(0.2)
    return seen


def snakemake(work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--directory", str(work), "--config",
            f"suite={SUITE}", *args]


def prepare_inputs(work: Path) -> None:
    """The data and the tiny base model, built locally (not what this test is about; as Slurm
    jobs they would add half a minute of queueing)."""
    result = subprocess.run(snakemake(work, "--cores", "2", f"data/{DATASET}", f"models/{MODEL}"),
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure(result)


@pytest.fixture(scope="module")
def two_node_run(two_nodes, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-two-nodes")
    prepare_inputs(work)
    command = on_login_node(snakemake(
        work, "--profile", "slurm", "--slurm-init-seconds-before-status-checks",
        str(FIRST_CHECK_S), *(str(run_dir(loss) / "model") for loss in ("sft+dpo", KILLED))))
    start = time.monotonic()
    out_path = work / "snakemake.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=cluster_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seen = _watch(proc, work)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    elapsed = time.monotonic() - start
    print(f"two-node run: {elapsed:.0f} s; {seen}")
    return work, proc.returncode, out_path.read_text(), seen


@pytest.mark.slow
def test_sft_and_dpo_train_with_one_rank_on_each_node(two_node_run):
    work, returncode, output, _ = two_node_run
    assert returncode == 0, failure(subprocess.CompletedProcess([], returncode, output, ""))
    for rule, loss in (("sft", None), ("align", "sft+dpo"), ("align", KILLED)):
        log = log_file(work, rule, loss).read_text()
        for rank, (host, address) in enumerate(NODES.items()):
            assert f"[halos] node {rank} of 2: {host} ({address}" in log, log[-3000:]
        info = training_info(work, loss or "sft")
        assert info["world_size"] == 2, info
    # ref-logps is a one-node job ("infer" resources): one process, no rendezvous.
    assert "[halos] node" not in log_file(work, "ref_logps").read_text()


def training_info(work: Path, loss: str) -> dict:
    return json.loads((work / run_dir(loss) / "model" / "halos_training.json").read_text())


def _rendezvous_port(log: str) -> int:
    ports = set(re.findall(r"rendezvous at halos-n1:(\d+)", log))
    assert len(ports) == 1, ports
    return int(ports.pop())


def _last_job_id(output: str, loss: str) -> int:
    ids = re.findall(rf"submitted with SLURM jobid (\d+) \(log: \S+/rule_align/{MODEL}_"
                     rf"{DATASET}_{re.escape(loss)}/", output)
    assert ids, output[-3000:]
    return int(ids[-1])


@pytest.mark.slow
def test_two_jobs_at_once_each_on_its_own_rendezvous_port(two_node_run):
    work, _, output, seen = two_node_run
    assert len(seen["together"]) == 2, "the two dpo jobs never ran at the same time"
    ports = {}
    for loss in ("sft+dpo", KILLED):
        ports[loss] = _rendezvous_port(log_file(work, "align", loss).read_text())
        assert ports[loss] == hs.rendezvous_port(_last_job_id(output, loss)), ports
    assert len(set(ports.values())) == 2, ports


@pytest.mark.slow
def test_two_node_model_equals_a_one_node_two_process_run(two_node_run, tmp_path):
    """The same dpo job (same start model, reference log-probs, seed, world size 2) run as two
    processes of one torchrun on one host gives the same consolidated model."""
    work = two_node_run[0]
    suite = hs.load_suite(SUITE)
    args = shlex.split(hs.align_args(suite, MODEL, DATASET, "sft+dpo"))
    local_env = {k: v for k, v in env().items() if k != "GLOO_SOCKET_IFNAME"}
    start = time.monotonic()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
         "-m", "halos", "align", *args, "--out", str(tmp_path / "one-node")],
        cwd=work, env=dict(local_env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two_node = load_file(work / run_dir("sft+dpo") / "model" / "model.safetensors")
    one_node = load_file(tmp_path / "one-node" / "model" / "model.safetensors")
    assert two_node.keys() == one_node.keys()
    diff = max((two_node[k] - one_node[k]).abs().max().item() for k in two_node)
    print(f"one-node run: {time.monotonic() - start:.0f} s; max |two-node - one-node| = {diff:.3g}")
    assert diff <= 1e-5, diff
    assert any(not torch.equal(two_node[k], load_file(
        work / run_dir("sft") / "model" / "model.safetensors")[k]) for k in two_node), \
        "dpo changed nothing: the comparison would prove nothing"


@pytest.mark.slow
def test_a_node_lost_midway_fails_the_job_and_the_retry_resumes(two_node_run):
    work, returncode, output, seen = two_node_run
    assert seen["killed_at_step"] and seen["killed_pids"], seen
    jobid = seen["killed_job"]
    assert f"SLURM-job '{jobid}' failed" in output, output[-3000:]
    assert _last_job_id(output, KILLED) != int(jobid), "the failed job was not resubmitted"
    log = log_file(work, "align", KILLED).read_text()
    assert "resumed from" in log, log[-3000:]
    resumed = int(log.split("resumed from", 1)[1].splitlines()[0].rsplit("at step", 1)[1])
    assert resumed >= seen["killed_at_step"], (resumed, seen)
    assert returncode == 0 and (work / run_dir(KILLED) / "model" / "model.safetensors").is_file()
    assert not (work / run_dir(KILLED) / "checkpoints").exists()
