"""Online PPO (`halos ppo`): one rollout in process, then the real CLI on the synthetic task.

- a rollout of a tiny model: responses cut after the first EOS and bounded by response_length,
  per-token grids on the response mask, the KL penalty on it, the score at the last token;
- SFT → reward model (`halos align --loss rm`) → `halos ppo`: the reward model scores the PPO
  policy's held-out completions above the SFT model's; the synthetic program judge is measured
  and printed (it is not asserted: the tiny reward model mostly learns that refusals are bad);
- two processes under ZeRO-3 (torchrun) finish and write the model;
- a run resumed from its checkpoint ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, metrics, run_halos
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from halos.config import PPOConfig
from halos.models.tiny import build_tiny_model, train_tokenizer
from halos.models.value_head import ValueHeadModel
from halos.rl import ppo_math as rl
from halos.rl.models import PolicyAndValue, SampledTokenLogps
from halos.rl.online_ppo import OnlinePPO
from halos.rl.rollout import add_ppo_targets, make_schedule
from halos.train.metrics import MetricsLogger
from halos.train.session import Session

RESPONSE_LENGTH = 8
# Tiny PPO runs: 16 rollouts per iteration, short answers, held-out samples at start and end.
PPO_FAST = ("--deepspeed", "zero0", "--no-progress", "--max-length", "64",
            "--max-prompt-length", "32", "--micro-batch-size", "16", "--response-length", "12",
            "--learning-rate", "3e-4", "--num-sample-generations", "1")


# ================================================================== one rollout, in process
class _Engine:
    """The little of a DeepSpeed engine a rollout uses."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, *args):
        return self.module(*args)

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()


def _eos_prone(lm: nn.Module, eos: int) -> nn.Module:
    """Raise the EOS logit so that some sampled responses stop early and others run out."""
    head = lm.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos] = 2.5
    lm.config.tie_word_embeddings = False
    lm.set_output_embeddings(biased)
    return lm


@pytest.fixture(scope="module")
def rollout(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory):
    from halos.data.prepare import read_rows
    from halos.rl.rollout import encode

    texts = [m["content"] for r in read_rows(synthetic_data / "train.jsonl")[:300]
             for m in r["prompt"] + r["chosen"]]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    lms = [build_tiny_model("tiny-1m", tokenizer, seed=s) for s in range(3)]
    policy = SampledTokenLogps(_eos_prone(lms[0], tokenizer.eos_token_id), 1024,
                               temperature=0.7)
    cfg = PPOConfig(model="-", data=str(synthetic_data), out=str(tmp_path_factory.mktemp("ppo")),
                    reward_model="-", response_length=RESPONSE_LENGTH, micro_batch_size=8,
                    local_rollout_forward_batch_size=5)
    schedule = make_schedule(cfg, n_prompts=8, world=1)
    logger = MetricsLogger(Path(cfg.out), enabled=False, total_steps=1, run_name="t", config={},
                           progress=False, tensorboard=False, wandb=False, wandb_project="")
    runner = OnlinePPO(_Engine(PolicyAndValue(policy, ValueHeadModel(lms[1]))),
                       SampledTokenLogps(lms[0], 1024, 0.7).eval(), ValueHeadModel(lms[2]).eval(),
                       tokenizer, cfg, schedule, logger,
                       Session(Path(cfg.out), Path(cfg.out) / "model", 0, 1, {}))
    prompts = encode([r["prompt"] for r in read_rows(synthetic_data / "test.jsonl")[:8]], cfg,
                     tokenizer)
    torch.manual_seed(0)
    return add_ppo_targets(runner.rollout(prompts.ids), cfg), prompts, tokenizer, cfg


def test_rollout_responses_stop_at_eos_and_are_bounded(rollout) -> None:
    batch, prompts, tokenizer, _ = rollout
    eos, lengths = tokenizer.eos_token_id, []
    for row, prompt in enumerate(prompts.ids):
        scored = batch.loss_mask[row]
        assert batch.input_ids[row, : len(prompt)].tolist() == prompt
        assert not scored[: len(prompt)].any() and scored[len(prompt)]
        response = batch.input_ids[row][scored].tolist()
        assert 1 <= len(response) <= RESPONSE_LENGTH
        assert eos not in response[:-1]  # cut right after the first EOS
        assert batch.has_eos[row] == (response[-1] == eos)
        lengths.append(len(response))
    # The EOS-prone policy stops early on some prompts and runs out of tokens on others.
    assert batch.has_eos.any() and min(lengths) < RESPONSE_LENGTH


def test_rollout_grids_kl_and_rewards(rollout) -> None:
    batch, prompts, _, cfg = rollout
    n, width = batch.input_ids.shape
    assert batch.mask.shape == (n, width - 1) and torch.equal(batch.mask, batch.loss_mask[:, 1:])
    for name in ("logps", "ref_logps", "values", "kl", "rewards", "advantages", "returns"):
        assert getattr(batch, name).shape == (n, width - 1), name
    assert batch.scores.shape == (n,)
    assert (batch.logps[batch.mask] < 0).all() and (batch.logps[~batch.mask] == 0).all()
    # The same weights as policy and reference: the KL penalty is 0 up to float noise.
    torch.testing.assert_close(batch.kl, torch.zeros_like(batch.kl), atol=1e-5, rtol=0)
    assert (batch.kl[~batch.mask] == 0).all()
    # The score sits at the last response token only; advantages live on the mask.
    score_part = batch.rewards - batch.non_score_reward
    last = [int(torch.nonzero(row).max()) for row in batch.mask]
    for row, col in enumerate(last):
        assert score_part[row, col] == pytest.approx(float(batch.scores[row]), abs=1e-5)
        score_part[row, col] = 0
    assert (score_part == 0).all()
    assert (batch.advantages[~batch.mask] == 0).all()
    assert float(rl.masked_mean(batch.advantages, batch.mask)) == pytest.approx(0, abs=1e-5)


def test_minibatch_rows_are_trimmed_to_their_longest_sequence(rollout) -> None:
    batch = rollout[0]
    rows = torch.tensor([0, 3])
    part = batch.select(rows)
    width = int(batch.attention_mask[rows].sum(1).max())
    assert part.input_ids.shape == (2, width) and part.mask.shape == (2, width - 1)
    assert torch.equal(part.logps, batch.logps[rows][:, : width - 1])
    assert torch.equal(part.scores, batch.scores[rows])


def test_bad_options_name_the_option(synthetic_data: Path, tiny_model: Path, tmp_path: Path
                                     ) -> None:
    base = ["ppo", "--model", tiny_model, "--data", synthetic_data, "--out", tmp_path / "x"]
    result = run_halos(*base, check=False)
    assert result.returncode == 2 and "--reward-model is required" in result.stderr
    result = run_halos(*base, "--reward-model", tiny_model, check=False)
    assert result.returncode == 2 and "value_head.safetensors" in result.stderr
    (tmp_path / "value_head.safetensors").write_bytes(b"")
    result = run_halos(*base, "--reward-model", tmp_path, "--kl-coef", "-1", check=False)
    assert result.returncode == 2 and "--kl-coef must be a number >= 0" in result.stderr


# ================================================================== the real CLI
@pytest.fixture(scope="module")
def reward_model(sft_model: Path, synthetic_data: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rm")
    run_halos("align", "--loss", "rm", "--model", sft_model, "--data", synthetic_data,
              "--out", out, *FAST, "--micro-batch-size", "32", "--learning-rate", "3e-4")
    return out / "model"


def _ppo(sft_model: Path, reward_model: Path, data: Path, out: Path, *extra: str,
         launcher: list[str] | None = None):
    return run_halos("ppo", "--model", sft_model, "--reward-model", reward_model, "--data", data,
                     "--out", out, *PPO_FAST, *extra, launcher=launcher)


def _judge(samples: Path, baseline: Path, out: Path, judge: str) -> dict:
    run_halos("eval", "judge", "--samples", samples, "--baseline", baseline, "--out", out,
              "--judge", judge)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ppo_raises_the_reward_model_score_over_sft(sft_model: Path, reward_model: Path,
                                                    synthetic_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    _ppo(sft_model, reward_model, synthetic_data, out, "--max-steps", "30",
         "--num-sample-generations", "3")
    log = metrics(out, "train")
    assert [r["step"] for r in log] == list(range(1, 31))
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward",
                "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
                "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
                "policy/entropy_avg", "val/ratio", "val/num_eos_tokens", "lr", "episode", "eps"):
        assert all(r[key] is not None for r in log), key
    assert log[-1]["episode"] == 30 * 16 and log[-1]["objective/kl"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 10, 20, 30]
    assert {p.name for p in (out / "value_model").iterdir()} >= {"value_head.safetensors",
                                                                 "model.safetensors"}

    # Held-out completions of SFT and PPO (greedy), scored by the reward model and the program.
    prompts = synthetic_data / "prompts.jsonl"
    for name, model in (("sft", sft_model), ("ppo", out / "model")):
        run_halos("sample", "--model", model, "--prompts", prompts, "--out",
                  tmp_path / f"{name}.jsonl", "--n", "32", "--max-new-tokens", "12")
    by_rm = _judge(tmp_path / "ppo.jsonl", tmp_path / "sft.jsonl", tmp_path / "rm.json",
                   f"rm:{reward_model}")
    by_program = _judge(tmp_path / "ppo.jsonl", tmp_path / "sft.jsonl", tmp_path / "syn.json",
                        "synthetic")
    print(f"\nmean reward-model score of held-out greedy completions: SFT "
          f"{by_rm['baseline_score']:.3f} -> PPO {by_rm['judge_score']:.3f}; "
          f"training rollouts {log[0]['objective/scores']:.3f} -> {log[-1]['objective/scores']:.3f}"
          f"\nsynthetic judge: SFT {by_program['baseline_score']:.3f} -> PPO "
          f"{by_program['judge_score']:.3f}, win rate vs SFT {by_program['win_rate']:.3f} "
          f"(90% CI {by_program['ci90'][0]:.3f}-{by_program['ci90'][1]:.3f})")
    assert by_rm["judge_score"] > by_rm["baseline_score"]
    assert by_program["n"] == 32


@pytest.mark.slow
def test_zero3_on_two_cpu_processes(sft_model: Path, reward_model: Path, synthetic_data: Path,
                                    tmp_path: Path) -> None:
    out = tmp_path / "zero3"
    fast = ["--deepspeed", "zero3", "--micro-batch-size", "8", "--max-steps", "3",
            "--num-mini-batches", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29541", "-m", "halos"]
    _ppo(sft_model, reward_model, synthetic_data, out, *fast, launcher=torchrun)
    summary = json.loads((out / "model" / "halos_training.json").read_text())
    assert summary["world_size"] == 2 and summary["loss"] == "online_ppo"
    assert summary["episodes"] == 3 * 2 * 16  # 2 processes x 2 mini-batches x 8
    assert [r["step"] for r in metrics(out, "train")] == [1, 2, 3]
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    start = AutoModelForCausalLM.from_pretrained(sft_model).state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert (out / "value_model" / "value_head.safetensors").is_file()


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(sft_model: Path, reward_model: Path,
                                                  synthetic_data: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = ("--max-steps", "4", "--save-every", "2", "--keep-checkpoints")
    _ppo(sft_model, reward_model, synthetic_data, straight, *options)
    assert (straight / "checkpoints" / "latest").read_text() == "step_4"  # the final one
    # The state of a run killed after its checkpoint at iteration 2.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    (resumed / "checkpoints" / "latest").write_text("step_2")
    for name in ("model", "value_model"):
        shutil.rmtree(resumed / name)
    result = _ppo(sft_model, reward_model, synthetic_data, resumed, *options)
    assert "resumed from" in result.stdout + result.stderr
    for name in ("model", "value_model"):
        want = load_file(straight / name / "model.safetensors")
        got = load_file(resumed / name / "model.safetensors")
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
    steps = [json.loads(line)["step"] for line in
             (resumed / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [0, 4]
