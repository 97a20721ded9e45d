"""Faults a user met when trying to break a run (issue 15): post-processed logits, KL partners
longer than --max-length, skipped rows, two runs on one folder, a full or read-only disk,
debris of a killed save, corrupted checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAST, halos_env, run_halos
from safetensors.torch import load_file

from halos.config import ConfigError, TrainConfig
from halos.files import write_jsonl
from halos.losses import build_loss
from halos.train.batching import kl_partners
from halos.train.dataview import load_view
from halos.train.logps import CausalLMLogps, naive_sequence_logps

TINY = dict(vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# Architectures whose forward changes the LM head's output before the softmax.
POSTPROCESSED = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=0.5)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=7.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.125)),
    "phi (lm_head bias)": ("PhiConfig", "PhiForCausalLM", dict(head_dim=None)),
}


def _tiny_lm(config_name: str, model_name: str, extra: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {k: v for k, v in {**TINY, **extra}.items() if v is not None}
    config = getattr(transformers, config_name)(**options)
    model = getattr(transformers, model_name)(config).double().eval()
    for p in model.parameters():  # random, large enough that the post-processing matters
        p.data.normal_(0, 0.3)
    return model


def _scored_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    input_ids = torch.randint(0, TINY["vocab_size"], (3, 17))
    attention_mask = torch.ones_like(input_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, 6:] = True
    return input_ids, attention_mask, loss_mask


@pytest.mark.parametrize("arch", sorted(POSTPROCESSED))
def test_log_probs_apply_the_models_own_logit_postprocessing(arch: str) -> None:
    model = _tiny_lm(*POSTPROCESSED[arch])
    ids, attention, scored = _scored_batch()
    with torch.no_grad():
        sums, tokens = CausalLMLogps(model, chunk_size=5)(ids, attention, scored)
        expected = naive_sequence_logps(model(ids, attention_mask=attention).logits, ids, scored)
    assert torch.equal(tokens, expected.tokens)
    torch.testing.assert_close(sums, expected.sums, rtol=1e-9, atol=1e-9)


def test_unsupported_logit_postprocessing_is_refused() -> None:
    model = _tiny_lm("LlamaConfig", "LlamaForCausalLM", {})
    model.config.model_type = "new_arch"
    model.config.logit_scale = 3.0  # a field the trainer cannot know how this model applies
    with pytest.raises(ConfigError, match="logit_scale"):
        CausalLMLogps(model)


# ----------------------------------------------------------------------------- data views
def _cfg(data: Path, tiny_model: Path, **options) -> TrainConfig:
    return TrainConfig(model=str(tiny_model), data=str(data), out=str(data / "out"), **options)


def _unpaired(i: int, prompt: str, completion: str) -> dict:
    return {"id": f"r{i}", "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}],
            "label": "desirable" if i % 2 else "undesirable"}


def test_kl_partner_sequences_fit_max_length(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    long_text = " ".join(f"What is {i} plus {i + 1}?" for i in range(12))
    rows = [_unpaired(i, long_text if i % 2 else "Hi", "Sure." if i % 2 else long_text)
            for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = _cfg(tmp_path, tiny_model, max_length=48, max_prompt_length=32)
    view = load_view(cfg, build_loss("kto", {}), tokenizer, "train")
    kl = [len(e.prompt_ids) + len(c) for e, c in zip(view.examples, view.kl_completions,
                                                     strict=True)]
    untruncated = [len(view.examples[i].prompt_ids) + len(view.examples[j].completion_ids)
                   for i, j in enumerate(kl_partners(len(view), cfg.seed))]
    assert max(untruncated) > 48  # the data does build over-long mismatched pairs
    assert max(kl) <= 48 and min(len(c) for c in view.kl_completions) >= 1
    batch = view.batch(list(range(len(view))))
    assert batch.kl.input_ids.shape[1] <= 48


@pytest.fixture()
def bad_data(synthetic_data: Path, tmp_path: Path) -> Path:
    """The synthetic data with a broken JSON line and a row without a prompt in every file."""
    out = tmp_path / "bad"
    shutil.copytree(synthetic_data, out)
    for name in ("sft.jsonl", "train.jsonl", "test.jsonl"):
        lines = (out / name).read_text().splitlines()
        row = json.loads(lines[3])
        del row["prompt"]
        lines[1], lines[3] = '{"id": "broken", ', json.dumps(row)
        (out / name).write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize(("split", "kind"), [("train", "sft"), ("train", "paired"),
                                             ("test", "unpaired")])
def test_skipped_rows_are_counted_with_their_reason(bad_data: Path, tiny_model: Path, split: str,
                                                    kind: str, capsys) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = _cfg(bad_data, tiny_model, on_error="skip", eval_examples=0)
    view = load_view(cfg, build_loss("sft", {}), tokenizer, split, kind=kind,
                     with_kl=kind == "unpaired")
    out = capsys.readouterr().out
    name = "sft.jsonl" if kind == "sft" else f"{split}.jsonl"
    good = len((bad_data / name).read_text().splitlines()) - 2
    halves = 2 if kind == "unpaired" and split == "test" else 1
    assert len(view) == good * halves
    assert f"kept {good * halves}, dropped 2 (" in out, out
    assert re.search(rf"skipped {re.escape(str(bad_data / name))}:2: .*JSON", out), out
    assert re.search(rf"skipped {re.escape(str(bad_data / name))}:4: .*prompt", out), out


def test_bad_rows_stop_the_run_unless_skipped(bad_data: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match=r"sft.jsonl:2: .*--on-error skip"):
        load_view(_cfg(bad_data, tiny_model), build_loss("sft", {}), tokenizer, "train")


# ----------------------------------------------------------------------------- real runs
def sft(model: Path, data: Path, out: Path, *extra: str, check: bool = True):
    return run_halos("sft", "--model", model, "--data", data, "--out", out, *FAST,
                     "--learning-rate", "3e-3", "--max-steps", "4", *extra, check=check)


def one_line_error(result, *parts: str) -> str:
    """The run failed with exit code 2 and a single error line holding `parts`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines, result.stderr[-3000:]
    assert lines[-1].startswith("halos ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    for part in parts:
        assert part in lines[-1], lines[-1]
    return lines[-1]


def same_weights(a: Path, b: Path) -> None:
    want, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def kept_run(tiny_model: Path, synthetic_data: Path, tmp_path_factory) -> Path:
    """A finished 4-step SFT run that kept its checkpoints (steps 2 and 4)."""
    out = tmp_path_factory.mktemp("kept") / "run"
    sft(tiny_model, synthetic_data, out, "--save-every", "2", "--keep-checkpoints")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_2",
                                                                       "step_4"]
    return out


HOLDER = """
import os, signal, sys
from pathlib import Path
from halos.files import atomic_dir
from halos.train.outdir import acquire, lock_file
out = Path(sys.argv[1])
acquire(lock_file(out), "--out " + str(out))
acquire(lock_file(out / "ref.pt", is_file=True), "--out " + str(out / "ref.pt"))
with atomic_dir(out / "model") as tmp:  # killed in the middle of the final save
    (tmp / "model.safetensors").write_bytes(b"half")
    print("saving", flush=True)
    signal.pause()
"""


def test_second_run_on_a_locked_folder_is_refused_and_a_killed_ones_debris_removed(
        tiny_model: Path, bad_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                              text=True, env=halos_env())
    try:
        assert holder.stdout.readline().strip() == "saving"
        host = socket.gethostname()
        one_line_error(sft(tiny_model, bad_data, out, check=False),
                       f"--out {out} is in use by another run (PID {holder.pid} on {host}")
        one_line_error(run_halos("ref-logps", "--model", tiny_model, "--data", bad_data,
                                 "--out", out / "ref.pt", *FAST, check=False),
                       f"--out {out / 'ref.pt'} is in use by another run (PID {holder.pid}")
        assert not (out / "model").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert len(list(out.glob(".model.*.tmp"))) == 1  # what a kill during the save leaves

    result = sft(tiny_model, bad_data, out, "--on-error", "skip")
    log = result.stdout + result.stderr
    assert f"(PID {holder.pid} on {host}" in log and "stale" in log
    assert re.search(r"removed .*/\.model\.\w+\.tmp, left by a run killed", log), log
    assert not list(out.glob(".*.tmp")) and (out / "model" / "model.safetensors").is_file()
    assert re.search(r"train \(sft\): tokenized \d+: kept \d+, dropped 2 "
                     r"\(malformed_json: 1, missing_field: 1\)", log), log
    assert "skipped " + str(bad_data / "sft.jsonl") + ":2:" in log


def _truncate_shards(checkpoint: Path) -> None:
    for shard in checkpoint.glob("*.pt"):
        os.truncate(shard, shard.stat().st_size // 2)


def test_corrupted_checkpoint_falls_back_to_the_previous_one_or_names_the_folder(
        kept_run: Path, tiny_model: Path, synthetic_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(kept_run, out)
    shutil.rmtree(out / "model")  # as if the final save never happened
    _truncate_shards(out / "checkpoints" / "step_4")
    result = sft(tiny_model, synthetic_data, out, "--save-every", "2", "--keep-checkpoints")
    log = result.stdout + result.stderr
    assert re.search(rf"checkpoint {re.escape(str(out))}/checkpoints/step_4 is unreadable "
                     rf"\(.+\); falling back to {re.escape(str(out))}/checkpoints/step_2", log), log
    assert "resumed from " + str(out / "checkpoints" / "step_2") + " at step 2" in log
    same_weights(kept_run / "model", out / "model")

    shutil.rmtree(out / "model")
    for step in ("step_2", "step_4"):
        _truncate_shards(out / "checkpoints" / step)
    one_line_error(sft(tiny_model, synthetic_data, out, "--save-every", "2", "--keep-checkpoints",
                       check=False),
                   f"no checkpoint under {out / 'checkpoints'} is readable (step_4, step_2;",
                   "is unreadable (PytorchStreamReader failed reading zip archive",
                   f"delete {out / 'checkpoints'} to start over")
    assert not (out / "model").exists()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A tmpfs of a chosen size (resizable), unmounted afterwards; needs root."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()

    def mount(size_bytes: int, remount: bool = False) -> Path:
        options = f"{'remount,' if remount else ''}size={size_bytes // 1024}k"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
        return folder

    yield mount
    subprocess.run(["umount", str(folder)], check=False)


def test_full_disk_during_a_checkpoint_keeps_the_last_complete_one(
        kept_run: Path, small_disk, tiny_model: Path, synthetic_data: Path) -> None:
    checkpoint, model = _size(kept_run / "checkpoints" / "step_2"), _size(kept_run / "model")
    out = small_disk(checkpoint + model + (2 << 20)) / "run"  # room for one checkpoint, not two
    result = sft(tiny_model, synthetic_data, out, "--save-every", "2", check=False)
    one_line_error(result, f"could not write checkpoint {out / 'checkpoints' / 'step_4'} (",
                   f"the last complete checkpoint {out / 'checkpoints' / 'step_2'} is kept and "
                   f"resumed from: free space and rerun the same command")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_2"]
    assert (out / "checkpoints" / "latest").read_text() == "step_2"
    assert not (out / "model").exists() and not list(out.rglob(".*.tmp"))


def test_failed_final_save_is_redone_from_the_final_checkpoint(
        kept_run: Path, small_disk, tiny_model: Path, synthetic_data: Path) -> None:
    checkpoint = _size(kept_run / "checkpoints" / "step_4")
    disk = small_disk(checkpoint + (1 << 20))  # the final checkpoint fits, the model not
    out = disk / "run"
    one_line_error(sft(tiny_model, synthetic_data, out, check=False),
                   f"could not write the final model {out / 'model'} (",
                   f"the last complete checkpoint {out / 'checkpoints' / 'step_4'} is kept",
                   "rerun the same command, which only saves again")
    assert not (out / "model").exists() and not list(out.glob(".model.*"))
    rows = (out / "metrics.jsonl").read_text()

    small_disk(64 << 20, remount=True)  # space freed
    result = sft(tiny_model, synthetic_data, out)
    assert f"resumed from {out / 'checkpoints' / 'step_4'} at step 4" in result.stdout + result.stderr
    same_weights(kept_run / "model", out / "model")
    assert (out / "metrics.jsonl").read_text() == rows  # nothing trained or evaluated again
    assert not (out / "checkpoints").exists()


def test_read_only_output_is_refused_before_any_work(tiny_model: Path, synthetic_data: Path,
                                                     tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (root ignores file permissions)")
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        result = sft(tiny_model, synthetic_data, folder / "run", check=False)
        one_line_error(result, f"--out {folder / 'run'}: cannot write to {folder}",
                       "Read-only file system")
        result = run_halos("ref-logps", "--model", tiny_model, "--data", synthetic_data,
                           "--out", folder / "ref.pt", *FAST, check=False)
        one_line_error(result, f"--out {folder / 'ref.pt'}: cannot write to {folder}")
        assert "kept" not in result.stdout  # refused before reading or scoring any data
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_without_flock_the_pid_in_the_lock_file_decides() -> None:
    """Filesystems without flock (some NFS mounts): a live holder blocks, a dead one is stale."""
    from halos.train.outdir import _still_running

    here = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _still_running(f"PID {sleeper.pid} on {here}, since 10:00:00")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not _still_running(f"PID {sleeper.pid} on {here}, since 10:00:00")
    assert _still_running(f"PID {sleeper.pid} on another-node-{here}, since 10:00:00")
    assert not _still_running("")


def test_ref_logps_that_cannot_fit_is_refused_before_scoring(small_disk, tiny_model: Path,
                                                             synthetic_data: Path) -> None:
    out = small_disk(96 << 10) / "ref.pt"
    result = run_halos("ref-logps", "--model", tiny_model, "--data", synthetic_data, "--out",
                       out, *FAST, check=False)
    one_line_error(result, f"--out {out}: ", "KB free there, the reference log-probs of ")
    assert not out.exists() and not list(out.parent.glob(".ref.pt.*.tmp"))
