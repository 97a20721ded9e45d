"""The trainer core for real: DeepSpeed on the CPU, subprocesses, the `halos` CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, halos_env, metrics, run_halos
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_sft_writes_a_loadable_hugging_face_folder(sft_model: Path) -> None:
    files = {p.name for p in sft_model.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "halos_training.json"} <= files
    model = AutoModelForCausalLM.from_pretrained(sft_model)
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                           add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    log = metrics(sft_model.parent, "train")
    assert log[-1]["loss"] < log[0]["loss"] - 1.0  # it learned something
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert key in log[0]
    assert not (sft_model.parent / "checkpoints").exists()  # removed after the final save


def test_reference_file_for_another_model_is_refused(tiny_model: Path, synthetic_data: Path,
                                                     sft_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "dpo"
    result = run_halos("align", "--loss", "dpo", "--model", tiny_model, "--data", synthetic_data,
                       "--ref-logps", sft_reference, "--out", out, *FAST, check=False)
    assert result.returncode == 2
    assert "was computed with reference model" in result.stderr
    assert not (out / "model").exists()


def test_reference_file_for_other_data_is_refused(sft_model: Path, synthetic_data: Path,
                                                  sft_reference: Path, tmp_path: Path) -> None:
    # Another chat template tokenizes other sequences: their log-probs are not in the file.
    result = run_halos("align", "--loss", "dpo", "--model", sft_model, "--data", synthetic_data,
                       "--ref-logps", sft_reference, "--out", tmp_path / "dpo", *FAST,
                       "--chat-template", "human_assistant", check=False)
    assert result.returncode == 2
    assert "has no reference log-probs for" in result.stderr
    assert not (tmp_path / "dpo" / "model").exists()


def test_truncated_reference_file_is_refused(sft_model: Path, synthetic_data: Path,
                                             sft_reference: Path, tmp_path: Path) -> None:
    broken = tmp_path / "ref.pt"
    broken.write_bytes(sft_reference.read_bytes()[:1000])
    result = run_halos("align", "--loss", "dpo", "--model", sft_model, "--data", synthetic_data,
                       "--ref-logps", broken, "--out", tmp_path / "dpo", *FAST, check=False)
    assert result.returncode == 2 and "not a reference log-probs file" in result.stderr


@pytest.mark.slow
def test_tiny_sft_ref_dpo_raises_held_out_reward_accuracy(sft_model: Path, synthetic_data: Path,
                                                          sft_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "dpo"
    run_halos("align", "--loss", "dpo", "--beta", "0.1", "--model", sft_model, "--data",
              synthetic_data, "--ref-logps", sft_reference, "--out", out, *FAST,
              "--learning-rate", "1e-4", "--micro-batch-size", "16", "--eval-examples", "128")
    final = metrics(out, "eval")[-1]
    assert final["rewards/accuracy"] > 0.5, final
    assert final["rewards/margin"] > 0
    assert "rewards/chosen" in final and "rewards/rejected" in final


def _subset_of(reference: dict, of: dict) -> torch.Tensor:
    """Positions in `of` of the keys of `reference` (all must be there)."""
    pos = torch.searchsorted(of["keys"], reference["keys"]).clamp(max=len(of["keys"]) - 1)
    assert torch.equal(of["keys"][pos], reference["keys"])
    return pos


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_align_without_ref_logps_scores_its_reference_in_the_run(loss: str, sft_model: Path,
                                                                 synthetic_data: Path,
                                                                 sft_reference: Path,
                                                                 tmp_path: Path) -> None:
    """No --ref-logps: the run scores its own sequences (KTO: with their KL partners) with the
    initial model before the first step, into OUT/ref_logps.pt, and trains as with the file of
    `halos ref-logps`."""
    common = _short_align(loss, sft_model, synthetic_data)
    run_halos(*common, "--ref-logps", sft_reference, "--out", tmp_path / "file")
    in_run = tmp_path / "in-run"
    first = run_halos(*common, "--out", in_run)
    assert "wrote reference log-probs" in first.stdout
    scored, shared = (torch.load(p, weights_only=True) for p in (in_run / "ref_logps.pt",
                                                                 sft_reference))
    torch.testing.assert_close(scored["sums"], shared["sums"][_subset_of(scored, shared)],
                               atol=1e-4, rtol=1e-5)
    want = [r["loss"] for r in metrics(tmp_path / "file", "train")]
    assert [r["loss"] for r in metrics(in_run, "train")] == pytest.approx(want, abs=1e-4)


def _short_align(loss: str, model: Path, data: Path) -> tuple:
    return ("align", "--loss", loss, "--model", model, "--data", data, *FAST, "--max-steps", "4",
            "--learning-rate", "1e-4")


@pytest.mark.slow
def test_in_run_reference_is_reused_when_it_matches_and_rescored_when_not(
        sft_model: Path, synthetic_data: Path, tmp_path: Path) -> None:
    common, out = _short_align("dpo", sft_model, synthetic_data), tmp_path / "dpo"
    assert "wrote reference log-probs" in run_halos(*common, "--out", out).stdout
    again = run_halos(*common, "--out", out, "--overwrite")
    assert "wrote reference log-probs" not in again.stdout  # the same sequences: reused
    other = run_halos(*common, "--out", out, "--overwrite", "--chat-template", "human_assistant")
    assert "rescoring" in other.stdout and "wrote reference log-probs" in other.stdout


def test_reference_model_without_ref_logps_is_refused(sft_model: Path, tiny_model: Path,
                                                      synthetic_data: Path, tmp_path: Path) -> None:
    result = run_halos("align", "--loss", "dpo", "--model", sft_model, "--data", synthetic_data,
                       "--reference-model", tiny_model, "--out", tmp_path / "dpo", *FAST,
                       check=False)
    assert result.returncode == 2
    assert "--reference-model" in result.stderr and "pass that file too" in result.stderr


def _align_command(sft_model: Path, data: Path, sft_reference: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "halos", "align", "--loss", "dpo", "--model", str(sft_model),
            "--data", str(data), "--ref-logps", str(sft_reference), "--out", str(out), *FAST,
            "--max-steps", "12", "--save-every", "3", "--learning-rate", "1e-4"]


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(sft_model: Path, synthetic_data: Path,
                                                      sft_reference: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(_align_command(sft_model, synthetic_data, sft_reference, straight), check=True,
                   env=halos_env(), capture_output=True, timeout=600)

    process = subprocess.Popen(_align_command(sft_model, synthetic_data, sft_reference, resumed),
                               env=halos_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    latest = resumed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text() == "step_6") and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (resumed / "model").exists()
    logged = [r["step"] for r in metrics(resumed, "train")]
    assert 6 <= max(logged) < 12

    result = subprocess.run(_align_command(sft_model, synthetic_data, sft_reference, resumed),
                            env=halos_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr

    want = load_file(straight / "model" / "model.safetensors")
    got = load_file(resumed / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
    final_straight, final_resumed = metrics(straight, "train")[-1], metrics(resumed, "train")[-1]
    assert final_resumed["step"] == final_straight["step"] == 12
    assert final_resumed["loss"] == pytest.approx(final_straight["loss"], abs=1e-5)


def test_partial_checkpoint_is_never_resumed(sft_model: Path, synthetic_data: Path,
                                             sft_reference: Path, tmp_path: Path) -> None:
    """A checkpoint directory without the `latest` marker (a crash mid-write) is ignored."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_3.partial").mkdir(parents=True)
    (out / "checkpoints" / "step_3.partial" / "garbage").write_text("half-written")
    result = run_halos(*_align_command(sft_model, synthetic_data, sft_reference, out)[3:],
                       "--max-steps", "2", "--save-every", "0", "--eval-every", "1",
                       "--tensorboard")
    assert "resumed" not in result.stdout + result.stderr
    assert (out / "model" / "model.safetensors").is_file()
    # Periodic held-out eval, and the TensorBoard sink beside the JSONL log.
    assert [r["step"] for r in metrics(out, "eval")] == [1, 2]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_port", "29533", "-m", "halos"],
    "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
                  "--master_port", "29534", "--module", "halos"],
}


def _zero3_fast() -> list[str]:
    fast = list(FAST)
    fast[fast.index("--deepspeed") + 1] = "zero3"
    # Small logits chunks: the ranks score different numbers of tokens, hence make different
    # numbers of LM-head calls unless they agree on one (each call gathers the head under ZeRO-3).
    return fast + ["--logits-chunk-size", "16"]


@pytest.mark.slow
def test_zero3_two_processes_score_the_reference_in_the_run(sft_model: Path, synthetic_data: Path,
                                                            sft_reference: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "zero3"
    run_halos("align", "--loss", "dpo", "--model", sft_model, "--data", synthetic_data, "--out",
              out, *_zero3_fast(), "--max-steps", "3", "--learning-rate", "1e-4",
              launcher=LAUNCHERS["torchrun"], timeout=300)
    scored, shared = (torch.load(p, weights_only=True) for p in (out / "ref_logps.pt",
                                                                 sft_reference))
    torch.testing.assert_close(scored["sums"], shared["sums"][_subset_of(scored, shared)],
                               atol=1e-4, rtol=1e-5)
    assert [r["step"] for r in metrics(out, "train")] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_zero3_on_two_cpu_processes_trains(launcher: str, sft_model: Path, synthetic_data: Path,
                                           sft_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "zero3"
    fast = _zero3_fast()
    sharded_reference = tmp_path / "ref_logps.pt"
    run_halos("ref-logps", "--model", sft_model, "--data", synthetic_data, "--out",
              sharded_reference, *fast, launcher=LAUNCHERS[launcher], timeout=300)
    single, sharded = (torch.load(p, weights_only=True) for p in (sft_reference, sharded_reference))
    assert torch.equal(single["keys"], sharded["keys"])
    torch.testing.assert_close(sharded["sums"], single["sums"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sharded["token_logps"], single["token_logps"], atol=1e-4, rtol=1e-5)
    run_halos("align", "--loss", "dpo", "--model", sft_model, "--data", synthetic_data,
              "--ref-logps", sharded_reference, "--out", out, *fast, "--max-steps", "6",
              "--learning-rate", "1e-4", launcher=LAUNCHERS[launcher], timeout=300)
    summary = json.loads((out / "model" / "halos_training.json").read_text())
    assert summary["world_size"] == 2
    log = metrics(out, "train")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] > 0 for r in log)
    # The consolidated ZeRO-3 weights load and differ from the start.
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    start = AutoModelForCausalLM.from_pretrained(sft_model).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert all(trained[k].shape == start[k].shape for k in start)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_every_shipped_deepspeed_config_trains(config: str, sft_model: Path,
                                               synthetic_data: Path, tmp_path: Path) -> None:
    fast = list(FAST)
    fast[fast.index("--deepspeed") + 1] = config
    checkpointing = ["--activation-checkpointing"] if config == "zero2" else []
    run_halos("sft", "--model", sft_model, "--data", synthetic_data, "--out", tmp_path, *fast,
              "--max-steps", "2", "--gradient-accumulation-steps", "2", *checkpointing)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in metrics(tmp_path, "train")] == [1, 2]


def test_failed_run_leaves_no_final_model(tmp_path: Path, synthetic_data: Path) -> None:
    result = run_halos("sft", "--model", tmp_path / "no-such-model", "--data", synthetic_data,
                       "--out", tmp_path / "out", *FAST, check=False)
    assert result.returncode != 0
    assert not (tmp_path / "out" / "model").exists()


def test_copying_a_finished_run_needs_overwrite(sft_model: Path, synthetic_data: Path,
                                                tmp_path: Path) -> None:
    shutil.copytree(sft_model, tmp_path / "model")
    result = run_halos("sft", "--model", sft_model, "--data", synthetic_data, "--out", tmp_path,
                       *FAST, check=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr
