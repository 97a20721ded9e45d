"""The evaluation commands that run a real (tiny, random-init) model: sampling, preference
metrics against a reference file from `halos ref-logps`, the reward-model judge, and
lm-evaluation-harness on the local task YAMLs (run from another working directory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_halos

from halos.eval.cli import main_eval, main_sample
from halos.files import write_jsonl

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "evals" / "tasks"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from halos.data.synthetic import generate

    out = tmp_path_factory.mktemp("evaldata") / "synthetic"
    generate(out, seed=0, n_train=200, n_test=64, n_sft=200, n_prompts=16)
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sample(model: Path, prompts: Path, out: Path, *extra: str) -> list[dict]:
    assert main_sample(["--model", str(model), "--prompts", str(prompts), "--out", str(out),
                        "--max-new-tokens", "8", *extra]) == 0
    return rows(out)


# --- halos sample -------------------------------------------------------------------------------

def test_greedy_sampling_is_deterministic_and_batch_invariant(tiny_model: Path, small_data: Path,
                                                              tmp_path: Path) -> None:
    prompts = small_data / "prompts.jsonl"
    first = sample(tiny_model, prompts, tmp_path / "a.jsonl", "--n", "10", "--batch-size", "4")
    sample(tiny_model, prompts, tmp_path / "b.jsonl", "--n", "10", "--batch-size", "4")
    single = sample(tiny_model, prompts, tmp_path / "c.jsonl", "--n", "10", "--batch-size", "1")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    # Left padding does not change greedy outputs.
    assert [r["completion"] for r in first] == [r["completion"] for r in single]
    source = rows(prompts)[:10]
    assert [r["id"] for r in first] == [r["id"] for r in source]
    for row, original in zip(first, source, strict=True):
        assert row["prompt"] == original["prompt"] and row["temperature"] == 0.0
        assert row["seed"] == 0 and isinstance(row["completion"], str)
        assert (row["a"], row["b"], row["answer"]) == (original["a"], original["b"],
                                                       original["answer"])


def test_temperature_sampling_is_seeded(tiny_model: Path, small_data: Path,
                                        tmp_path: Path) -> None:
    prompts = small_data / "prompts.jsonl"
    args = ("--n", "8", "--temperature", "1.0", "--batch-size", "4")
    a = sample(tiny_model, prompts, tmp_path / "a.jsonl", *args, "--seed", "1")
    sample(tiny_model, prompts, tmp_path / "b.jsonl", *args, "--seed", "1")
    c = sample(tiny_model, prompts, tmp_path / "c.jsonl", *args, "--seed", "2")
    greedy = sample(tiny_model, prompts, tmp_path / "g.jsonl", "--n", "8")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    texts = [r["completion"] for r in a]
    assert texts != [r["completion"] for r in c]
    assert texts != [r["completion"] for r in greedy]
    assert all(r["temperature"] == 1.0 and r["seed"] == 1 for r in a)


def test_prompts_are_rendered_as_training_rendered_them(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from halos.eval.sample import prompt_format
    from halos.models.generation import encode_prompts as encode

    def encode_prompts(prompts, tokenizer, info):
        return encode(prompts, tokenizer, prompt_format(info))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    (chatml,) = encode_prompts([prompt], tokenizer, {})
    assert tokenizer.decode(chatml).endswith("What is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n")
    info = {"loss": "dpo", "config": {"chat_template": "human_assistant"}}
    (plain,) = encode_prompts([prompt], tokenizer, info)
    assert tokenizer.decode(plain).endswith("Human: What is 2 plus 3?\n\nAssistant:")
    # CSFT conditions on its good token, added to the tokenizer by training.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|good|>", "<|bad|>"]})
    (csft,) = encode_prompts([prompt], tokenizer, {"loss": "csft", "config": {}})
    assert csft[:-1] == chatml and csft[-1] == tokenizer.convert_tokens_to_ids("<|good|>")


def test_sample_bad_input(tiny_model: Path, small_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--prompts"):
        main_sample(["--model", str(tiny_model), "--prompts", str(tmp_path / "none.jsonl"),
                     "--out", str(tmp_path / "o.jsonl")])
    with pytest.raises(ValueError, match="--temperature"):
        main_sample(["--model", str(tiny_model), "--prompts", str(small_data / "prompts.jsonl"),
                     "--out", str(tmp_path / "o.jsonl"), "--temperature", "-1"])
    with pytest.raises(FileNotFoundError, match="--model"):
        main_sample(["--model", str(tmp_path), "--prompts", str(small_data / "prompts.jsonl"),
                     "--out", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()


# --- halos eval preference ----------------------------------------------------------------------

def test_preference_against_itself_as_reference(tiny_model: Path, small_data: Path,
                                                tmp_path: Path) -> None:
    ref = tmp_path / "ref_logps.pt"
    run_halos("ref-logps", "--model", tiny_model, "--data", small_data, "--out", ref,
              "--deepspeed", "zero0", "--max-length", "64", "--max-prompt-length", "32",
              "--micro-batch-size", "32", "--no-progress")
    # The same weights, presented as a DPO run with beta 0.5 and training's data options.
    policy = tmp_path / "policy"
    shutil.copytree(tiny_model, policy)
    (policy / "halos_training.json").write_text(json.dumps({
        "loss": "dpo", "config": {"loss": "dpo", "loss_params": {"beta": 0.5}, "max_length": 64,
                                  "max_prompt_length": 32, "chat_template": ""}}))
    out = tmp_path / "preference.json"
    assert main_eval(["preference", "--model", str(policy), "--data", str(small_data),
                      "--out", str(out), "--ref-logps", str(ref), "--examples", "40"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 40 and result["beta"] == 0.5
    assert result["chosen_reward"] == 0.0 and result["rejected_reward"] == 0.0
    assert result["reward_margin"] == 0.0 and result["reward_accuracy"] == 0.0
    assert 0.0 <= result["logp_accuracy"] <= 1.0 and isinstance(result["logp_margin"], float)

    # Without a reference: only the policy's own ranking.
    bare = tmp_path / "bare.json"
    main_eval(["preference", "--model", str(policy), "--data", str(small_data), "--out", str(bare),
               "--examples", "40"])
    plain = json.loads(bare.read_text())
    assert plain["reward_accuracy"] is None and plain["chosen_reward"] is None
    assert plain["logp_accuracy"] == result["logp_accuracy"]


# --- halos eval judge --judge rm:DIR ------------------------------------------------------------

def test_reward_model_judge(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from halos.models.value_head import ValueHeadModel

    torch.manual_seed(0)
    rm = tmp_path / "rm"
    ValueHeadModel(AutoModelForCausalLM.from_pretrained(tiny_model)).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm)
    (rm / "halos_training.json").write_text(json.dumps(
        {"loss": "rm", "config": {"loss": "rm", "max_length": 64, "max_prompt_length": 32}}))
    prompts = [[{"role": "user", "content": f"What is {i} plus 2?"}] for i in range(6)]
    mine = [f"{i} plus 2 is {i + 2}." for i in range(6)]
    theirs = ["I don't know.", *mine[1:3], "Sorry, I can't help with that.", "7", "The answer is 9."]
    write_jsonl(tmp_path / "a.jsonl", [{"id": str(i), "prompt": p, "completion": c}
                                       for i, (p, c) in enumerate(zip(prompts, mine, strict=True))])
    write_jsonl(tmp_path / "b.jsonl", [{"id": str(i), "prompt": p, "completion": c}
                                       for i, (p, c) in enumerate(zip(prompts, theirs, strict=True))])
    out = tmp_path / "judge.json"
    main_eval(["judge", "--samples", str(tmp_path / "a.jsonl"), "--baseline",
               str(tmp_path / "b.jsonl"), "--out", str(out), "--judge", f"rm:{rm}"])
    result = json.loads(out.read_text())

    from halos.eval.judges import RewardModelJudge

    judge = RewardModelJudge(rm)
    a, b = judge.score_many(prompts, mine), judge.score_many(prompts, theirs)
    expected = [0.5 if abs(x - y) <= 1e-6 else float(x > y) for x, y in zip(a, b, strict=True)]
    assert result["ties"] == expected.count(0.5) >= 2  # identical replies tie
    assert result["wins"] == expected.count(1.0) and result["losses"] == expected.count(0.0)
    assert result["judge_score"] == pytest.approx(sum(a) / 6, rel=1e-5)
    assert result["judge"] == f"rm:{rm}"


# --- halos eval lm-eval -------------------------------------------------------------------------

def test_lm_eval_local_tasks_run_from_another_directory(tiny_model: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative data_files would not resolve from here
    out = tmp_path / "lm_eval.json"
    tasks = f"{TASKS / 'adder_mc.yaml'},{TASKS / 'adder_gen.yaml'}"
    assert main_eval(["lm-eval", "--model", str(tiny_model), "--tasks", tasks, "--out", str(out),
                      "--apply-chat-template", "--limit", "6", "--batch-size", "8"]) == 0
    result = json.loads(out.read_text())
    mc, gen = result["tasks"]["adder_mc"], result["tasks"]["adder_gen"]
    assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0
    assert 0.0 <= gen["exact_match"] <= 1.0
    config = result["config"]
    assert config["apply_chat_template"] is True and config["offline"] is True
    assert config["n_samples"]["adder_mc"]["effective"] == 6
    assert config["n_samples"]["adder_gen"]["original"] == 80


def test_task_yaml_paths_resolve_against_the_yaml(tmp_path: Path) -> None:
    from halos.eval.lmeval import load_task_yaml

    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    config = load_task_yaml(folder / "adder_mc.yaml")
    assert config["dataset_kwargs"]["data_files"]["test"] == str(
        (folder / "data" / "adder_mc.jsonl").resolve())
    (folder / "data" / "adder_mc.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="relative to the YAML"):
        load_task_yaml(folder / "adder_mc.yaml")
    with pytest.raises(FileNotFoundError):
        load_task_yaml(folder / "missing.yaml")


def test_shipped_task_data_is_what_the_script_makes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_adder_tasks",
                                                  REPO / "evals" / "make_adder_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mc, gen = module.rows(0)
    assert rows(TASKS / "data" / "adder_mc.jsonl") == mc
    assert rows(TASKS / "data" / "adder_gen.jsonl") == gen
    from halos.data.synthetic import build, operands

    facts = {(r["a"], r["b"]) for r in mc}
    assert len(facts) == len(mc) == len(gen) == 80
    assert all(r["choices"][r["gold"]].rstrip(".").endswith(str(r["a"] + r["b"])) for r in mc)
    trained = {operands(r["prompt"]) for r in build(seed=0, n_train=500, n_test=0, n_sft=0,
                                                    n_prompts=0)["train"]}
    assert not facts & trained  # held-out facts only


def test_eval_jobs_print_progress_lines(tiny_model: Path, small_data: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """A DAG job's log shows where sampling and the preference eval are (first and last batch)."""
    sample(tiny_model, small_data / "prompts.jsonl", tmp_path / "s.jsonl", "--n", "6",
           "--batch-size", "2")
    printed = capsys.readouterr().out
    assert "[halos] sample step 1/3 (33%)" in printed and "sample step 3/3 (100%)" in printed
    assert "peak RSS" in printed
    assert main_eval(["preference", "--model", str(tiny_model), "--data", str(small_data),
                      "--examples", "4", "--batch-size", "2",
                      "--out", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    assert "[halos] eval preference step 1/2 (50%)" in printed
    assert "eval preference step 2/2 (100%)" in printed
