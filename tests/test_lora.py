"""LoRA (peft) through the one trainer, for real: `halos align|sft|ppo --lora-r`, DeepSpeed
ZeRO-0 and ZeRO-3 on two CPU processes, the adapter and merged exports, resume, the tables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, metrics, run_halos
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import halos.suite as hs
from halos.models.value_head import ValueHeadModel, load_value_head

LORA = ("--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.0")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", "29561", "-m", "halos"]
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def lora_reward_model(sft_model: Path, synthetic_data: Path, tmp_path_factory) -> Path:
    """A reward model trained with LoRA adapters (its value head fully trained)."""
    out = tmp_path_factory.mktemp("lora-rm")
    result = run_halos("align", "--loss", "rm", "--model", sft_model, "--data", synthetic_data,
                       "--out", out, *FAST, *LORA, "--max-steps", "10",
                       "--learning-rate", "1e-3")
    (out / "stdout.txt").write_text(result.stdout + result.stderr)
    return out


def assert_merged_is_base_plus_adapter(run: Path, base: Path) -> dict[str, torch.Tensor]:
    """The adapter loads on the base model with PeftModel.from_pretrained, the merged model with
    AutoModelForCausalLM, and both give the same logits; only LoRA's parameters differ from the
    base model's, and the merged model changes only the adapted projections. Returns the
    adapter's tensors."""
    files = {p.name for p in (run / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == sorted(ADAPTED)
    start = AutoModelForCausalLM.from_pretrained(base).state_dict()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                        run / "adapter").eval()
    for name, value in adapted.state_dict().items():
        if "lora_" not in name:  # every base weight is the start's, bit for bit
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, start[key]), name
    merged = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    ids = torch.randint(4, 60, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(k.split(".")[-2] in ADAPTED for k in changed), changed
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k for k in tensors)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained
    return tensors


@pytest.fixture(scope="module")
def lora_dpo(sft_model: Path, synthetic_data: Path, sft_reference: Path, tmp_path_factory) -> Path:
    """A LoRA DPO run (results/tiny-1m/synthetic/sft+dpo-lora), with activation checkpointing
    over the frozen embeddings."""
    out = tmp_path_factory.mktemp("lora-dpo") / "results/tiny-1m/synthetic/sft+dpo-lora"
    result = run_halos("align", "--loss", "dpo", "--beta", "0.1", "--model", sft_model, "--data",
                       synthetic_data, "--ref-logps", sft_reference, "--out", out, *FAST, *LORA,
                       "--micro-batch-size", "16", "--eval-examples", "128", "--max-steps", "30",
                       "--learning-rate", "2e-3", "--activation-checkpointing")
    (out / "stdout.txt").write_text(result.stdout + result.stderr)
    return out


def test_lora_dpo_trains_only_adapters_and_raises_held_out_reward_accuracy(
        lora_dpo: Path, sft_model: Path, synthetic_data: Path, tmp_path: Path) -> None:
    out = lora_dpo
    assert "LoRA: 61,440 of 752,640 parameters train" in (out / "stdout.txt").read_text()
    final = metrics(out, "eval")[-1]
    assert final["rewards/accuracy"] > 0.5 and final["rewards/margin"] > 0, final
    assert_merged_is_base_plus_adapter(out, sft_model)
    summary = json.loads((out / "model" / "halos_training.json").read_text())
    assert summary["config"]["lora_r"] == 8
    # Sampling reads the merged model and the adapter folder (base + adapter) alike.
    completions = []
    for folder in ("model", "adapter"):
        samples = tmp_path / f"{folder}.jsonl"
        run_halos("sample", "--model", out / folder, "--prompts",
                  synthetic_data / "prompts.jsonl", "--out", samples, "--n", "4",
                  "--max-new-tokens", "6")
        completions.append([json.loads(line)["completion"]
                            for line in samples.read_text().splitlines()])
    assert len(completions[0]) == 4 and completions[0] == completions[1]


def test_publish_uploads_the_adapter_with_a_card_naming_the_base(lora_dpo: Path,
                                                                 tmp_path: Path) -> None:
    import os

    from hubserver import FakeHub
    from huggingface_hub import ModelCard

    hub = FakeHub(token="hf_test_lora")
    hub.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=hub.token,
                   HF_HOME=str(tmp_path / "hf_home"), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
        result = subprocess.run(
            [sys.executable, "-m", "halos.hub.cli", str(lora_dpo / "model"), "--adapter",
             "--repo", "my-org/tiny-dpo-lora", "--base-model", "my-org/tiny-sft", "--suite",
             "tiny", "--record", str(tmp_path / "published.json")],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        files = hub.files("my-org/tiny-dpo-lora")
    finally:
        hub.stop()
    assert "model.safetensors" not in files
    assert files["adapter_model.safetensors"].data == \
        (lora_dpo / "adapter" / "adapter_model.safetensors").read_bytes()
    config = json.loads(files["adapter_config.json"].data)
    assert config["base_model_name_or_path"] == "my-org/tiny-sft" and config["r"] == 8
    card = ModelCard(files["README.md"].data.decode())
    assert card.data.base_model == "my-org/tiny-sft" and card.data.library_name == "peft"
    assert "lora" in card.data.tags and card.data.halos["loss"] == "sft+dpo-lora"
    record = json.loads((tmp_path / "published.json").read_text())
    assert record["reload_check"]["ok"]  # the uploaded adapter, on its base, generates


def test_lora_reward_model_trains_its_value_head_fully(lora_reward_model: Path,
                                                       sft_model: Path) -> None:
    log = (lora_reward_model / "stdout.txt").read_text()
    assert "LoRA: 61,569 of 752,769 parameters train" in log  # adapters + the 128 + 1 head
    run = lora_reward_model
    assert_merged_is_base_plus_adapter(run, sft_model)
    head = load_value_head(run / "model")
    assert torch.equal(head.weight, load_value_head(run / "adapter").weight)
    # The merged reward model and base + adapter + head score alike.
    ids = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    merged = ValueHeadModel.from_pretrained(run / "model").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_model),
                                        run / "adapter")
    with torch.no_grad():
        want = ValueHeadModel(adapted, head).eval()(ids, mask, mask)[0]
        torch.testing.assert_close(merged(ids, mask, mask)[0], want, atol=1e-5, rtol=1e-5)


def test_lora_zero3_on_two_processes_resumes_to_the_same_adapter(
        sft_model: Path, synthetic_data: Path, sft_reference: Path, tmp_path: Path) -> None:
    fast = list(FAST)
    fast[fast.index("--deepspeed") + 1] = "zero3"
    args = ("align", "--loss", "dpo", "--model", sft_model, "--data", synthetic_data,
            "--ref-logps", sft_reference, *fast, *LORA, "--logits-chunk-size", "16",
            "--max-steps", "6", "--save-every", "3", "--keep-checkpoints",
            "--learning-rate", "1e-3")
    straight = tmp_path / "straight"
    run_halos(*args, "--out", straight, launcher=TORCHRUN, timeout=300)
    assert json.loads((straight / "model" / "halos_training.json").read_text())["world_size"] == 2
    want = assert_merged_is_base_plus_adapter(straight, sft_model)
    # Checkpoints hold the adapters and their optimizer state, not the frozen base weights.
    step = straight / "checkpoints" / "step_3"
    assert sum(p.stat().st_size for p in step.iterdir()) < \
        (straight / "model" / "model.safetensors").stat().st_size

    # The same run killed after step 3: resumed, it ends on the same adapter weights.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(step, resumed / "checkpoints" / "step_3")
    (resumed / "checkpoints" / "latest").write_text("step_3")
    result = run_halos(*args, "--out", resumed, launcher=TORCHRUN, timeout=300)
    assert "resumed from" in result.stdout + result.stderr
    got = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("value_lora", [True, False])
def test_lora_online_ppo_trains_policy_adapters(value_lora: bool, sft_model: Path,
                                                lora_reward_model: Path, synthetic_data: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    value_flag = "--lora-value-model" if value_lora else "--no-lora-value-model"
    run_halos("ppo", "--model", sft_model, "--reward-model", lora_reward_model / "model",
              "--data", synthetic_data, "--out", out, "--deepspeed", "zero0", "--no-progress",
              "--max-length", "64", "--max-prompt-length", "32", "--micro-batch-size", "8",
              "--response-length", "8", "--max-steps", "2", "--num-sample-generations", "1",
              "--learning-rate", "1e-3", *LORA, value_flag)
    assert_merged_is_base_plus_adapter(out, sft_model)
    assert (out / "value_adapter").is_dir() == value_lora
    value = AutoModelForCausalLM.from_pretrained(out / "value_model").state_dict()
    start = AutoModelForCausalLM.from_pretrained(lora_reward_model / "model").state_dict()
    changed = {k.split(".")[-2] for k in start if not torch.equal(value[k], start[k])}
    # LoRA changes the adapted projections only; full training the norms too.
    assert changed <= set(ADAPTED) if value_lora else "input_layernorm" in changed, changed
    assert (out / "value_model" / "value_head.safetensors").is_file()


def test_lora_csft_adapter_carries_the_embeddings_of_its_control_tokens(
        sft_model: Path, synthetic_data: Path, tmp_path: Path) -> None:
    """csft adds two control tokens: the adapter then holds the resized embeddings, and base
    (resized to the tokenizer) + adapter is the merged model."""
    from transformers import AutoTokenizer

    out = tmp_path / "csft"
    run_halos("align", "--loss", "csft", "--model", sft_model, "--data", synthetic_data,
              "--out", out, *FAST, *LORA, "--max-steps", "3", "--learning-rate", "1e-3")
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.weight" in tensors
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(sft_model)
    base.resize_token_embeddings(len(tokenizer))
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([[5, 9, len(tokenizer) - 1, 12, 7, len(tokenizer) - 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_target_module_is_a_one_line_error(sft_model: Path, synthetic_data: Path,
                                               tmp_path: Path) -> None:
    result = run_halos("sft", "--model", sft_model, "--data", synthetic_data, "--out", tmp_path,
                       *FAST, "--lora-r", "4", "--lora-target-modules", "qq_proj", check=False)
    assert result.returncode == 2
    assert re.search(r"--lora-target-modules 'qq_proj'.*qq_proj", result.stderr), result.stderr
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------- the tables


def test_lora_column_of_the_models_row_wins_over_the_losses_row() -> None:
    suite = hs.load_suite()
    args = hs.align_args(suite, "tiny-1m", "synthetic", "sft+dpo-lora")
    assert "--lora-r 8 --lora-alpha 16 --lora-dropout 0.0" in args
    assert "--lora-r" not in hs.align_args(suite, "tiny-1m", "synthetic", "sft+dpo")
    suite.models["tiny-1m"]["lora"] = {"r": 4, "target_modules": ["q_proj", "v_proj"],
                                       "value_model": False}
    args = hs.align_args(suite, "tiny-1m", "synthetic", "sft+dpo-lora")
    assert "--lora-r 4 --lora-alpha 16 --lora-dropout 0.0 --lora-target-modules q_proj,v_proj" \
        in args and "value-model" not in args
    assert "--no-lora-value-model" in hs.ppo_args(suite, "tiny-1m", "synthetic", "sft+ppo-online")
    assert "--lora-r 4" in hs.sft_args(suite, "tiny-1m", "synthetic")


def test_bad_lora_column_names_the_row(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "configs", tmp_path / "configs",
                    ignore=shutil.ignore_patterns("deepspeed"))
    losses = tmp_path / "configs" / "losses" / "tiny.yaml"
    losses.write_text(losses.read_text().replace("lora: {r: 8,", "lora: {rank: 8,"))
    with pytest.raises(hs.SuiteError, match=r"losses table .*'sft\+dpo-lora'.*rank"):
        hs.load_suite(tmp_path / "configs" / "suites" / "tiny.yaml")


# ----------------------------------------------------------------------------- the plan


def test_plan_memory_counts_the_adapters_and_the_frozen_base() -> None:
    from halos.plan import memory as mem
    from halos.plan.arch import model_arch
    from halos.plan.jobs import Options, Planner

    suite = hs.load_suite(Path(__file__).resolve().parent.parent / "configs/suites/archangel.yaml")
    arch = model_arch("llama-30b", suite.models["llama-30b"])
    adapters = mem.lora_params(arch, 16)
    assert 0.003 * arch.params < adapters < 0.005 * arch.params  # r16 on every projection
    setup = mem.Setup("zero3", 2, 1, micro_batch=4, sequences_per_example=2, max_length=512,
                      activation_checkpointing=True, logits_chunk=1024)
    full, lora = mem.estimate(arch, setup), mem.estimate(arch, setup.but(lora_rank=16))
    _, adapter_states = mem.deepspeed_model_states(adapters, arch.largest_layer_params, 3, False,
                                                   False, 2, 1)
    assert lora.model_states == adapter_states + arch.params * 2 // 2  # bf16 base, 2 shards
    # 30B on two 80 GB GPUs: full fine-tuning does not fit, LoRA does.
    assert full.per_gpu > 80 * 2**30 > lora.per_gpu
    # A models row's lora column reaches the plan of each of its training jobs.
    def dpo_memory() -> int:
        rows = Planner(suite, Options(count=False)).plan()
        return next(r.memory.model_states for r in rows
                    if (r.model, r.loss, r.rule) == ("llama-30b", "sft+dpo", "align"))

    before = dpo_memory()
    suite.models["llama-30b"]["lora"] = {"r": 16}
    assert dpo_memory() < before / 4


# ----------------------------------------------------------------------------- a real model


@pytest.mark.slow
def test_lora_dpo_on_smollm2_raises_held_out_reward_accuracy(smollm2_dir: Path,
                                                             tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, rank-16 adapters on its 30 layers' projections, 8 DPO steps."""
    from halos.data.synthetic import generate

    data = tmp_path / "data"
    generate(data, seed=0, n_train=64, n_test=16, n_sft=64, n_prompts=8)
    fast = ("--deepspeed", "zero0", "--no-progress", "--max-length", "64",
            "--max-prompt-length", "32", "--micro-batch-size", "8")
    ref = tmp_path / "ref_logps.pt"
    run_halos("ref-logps", "--model", smollm2_dir, "--data", data, "--out", ref,
              "--ref-views", "paired", *fast)
    out = tmp_path / "dpo"
    run_halos("align", "--loss", "dpo", "--model", smollm2_dir, "--data", data, "--ref-logps",
              ref, "--out", out, *fast, "--eval-examples", "16", "--lora-r", "16",
              "--lora-alpha", "32", "--lora-dropout", "0.0", "--learning-rate", "1e-3",
              "--max-steps", "8")
    final = metrics(out, "eval")[-1]
    assert final["rewards/accuracy"] > 0.5 and final["rewards/margin"] > 0, final
    adapter = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter < 0.05 * (out / "model" / "model.safetensors").stat().st_size
