"""What online PPO rolls out and learns from: the prompts, the batch schedule (TRL's names), the
rollout batch and its PPO targets (KL-penalised rewards, GAE advantages and returns)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from halos.config import ConfigError, PPOConfig
from halos.models.generation import SEED_STRIDE, PromptFormat, encode_prompts
from halos.rl import ppo_math as rl


@dataclass
class Prompts:
    messages: list[list[dict]]
    ids: list[list[int]]


def encode(messages: list[list[dict]], cfg: PPOConfig, tokenizer) -> Prompts:
    """Token ids with the generation prompt, exactly as `halos sample` will render them."""
    fmt = PromptFormat(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                       chat_template=cfg.chat_template or None)
    return Prompts(messages, encode_prompts(messages, tokenizer, fmt))


def unique(prompts: list[list[dict]]) -> list[list[dict]]:
    return list({json.dumps(p, sort_keys=True): p for p in prompts}.values())


def train_prompts(cfg: PPOConfig, tokenizer) -> Prompts:
    """The unique prompts of the training split (of its first --max-examples rows)."""
    from halos.data.prepare import read_rows

    rows = read_rows(Path(cfg.data) / "train.jsonl", on_error=cfg.on_error)
    rows = rows[: cfg.max_examples] if cfg.max_examples else rows
    if not rows:
        raise ConfigError(f"--data {cfg.data!r}: train.jsonl has no prompts")
    return encode(unique([r["prompt"] for r in rows]), cfg, tokenizer)


def held_out_prompts(cfg: PPOConfig, tokenizer) -> Prompts | None:
    """Held-out prompts of the logged sample generations (prompts.jsonl, else the test split):
    one rollout forward batch of them."""
    from halos.data.prepare import read_prompts, read_rows

    if not cfg.num_sample_generations:
        return None
    data, n = Path(cfg.data), cfg.local_rollout_forward_batch_size
    if (data / "prompts.jsonl").is_file():
        rows = read_prompts(data / "prompts.jsonl")
    elif (data / "test.jsonl").is_file():
        rows = read_rows(data / "test.jsonl", on_error=cfg.on_error)
    else:
        return None
    messages = unique([r["prompt"] for r in rows])[:n]
    return encode(messages, cfg, tokenizer) if messages else None


@dataclass(frozen=True)
class Schedule:
    """Batch sizes per process and the number of iterations (TRL's names in comments)."""

    micro: int  # per_device_train_batch_size: sequences per forward/backward
    mini: int  # local_mini_batch_size: micro × accumulation, one optimizer step
    local: int  # local_batch_size: rollouts per process and iteration, mini × num_mini_batches
    world: int
    iterations: int  # num_total_batches
    sample_every: int  # sample_generations_freq (0 = never)

    @property
    def batch(self) -> int:
        return self.local * self.world

    def optimizer_steps(self, cfg: PPOConfig) -> int:
        return self.iterations * cfg.num_ppo_epochs * cfg.num_mini_batches


def make_schedule(cfg: PPOConfig, n_prompts: int, world: int) -> Schedule:
    mini = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    local = mini * cfg.num_mini_batches
    episodes = cfg.total_episodes or cfg.epochs * n_prompts
    iterations = math.ceil(episodes / (local * world))
    if cfg.max_steps:
        iterations = min(iterations, cfg.max_steps)
    samples = cfg.num_sample_generations
    return Schedule(cfg.micro_batch_size, mini, local, world, iterations,
                    max(1, iterations // samples) if samples else 0)


def rollout_prompts(schedule: Schedule, n_prompts: int, iteration: int, rank: int,
                    seed: int) -> list[int]:
    """Prompt indices this process rolls out at `iteration`. The global batch is the next
    `schedule.batch` episodes of a stream of seeded shuffles of the prompts (one per pass), dealt
    round-robin to the processes: a pure function of the options, so a resumed run sees the
    same prompts."""
    start = iteration * schedule.batch
    orders: dict[int, list[int]] = {}
    picked = []
    for episode in range(start + rank, start + schedule.batch, schedule.world):
        epoch, position = divmod(episode, n_prompts)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)
            orders[epoch] = torch.randperm(n_prompts, generator=generator).tolist()
        picked.append(orders[epoch][position])
    return picked


@dataclass
class Rollout:
    """A rollout batch, right-padded. `mask` marks the response tokens on the (N, T-1) grid of
    next-token positions, where log-probs, values, advantages and returns live."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    loss_mask: torch.Tensor  # (N, T) response tokens
    mask: torch.Tensor  # (N, T-1) bool
    logps: torch.Tensor  # (N, T-1) of the policy that sampled
    ref_logps: torch.Tensor  # (N, T-1)
    values: torch.Tensor  # (N, T-1)
    scores: torch.Tensor  # (N,) reward-model scores (after missing_eos_penalty)
    has_eos: torch.Tensor  # (N,) bool
    advantages: torch.Tensor | None = None  # (N, T-1), whitened
    returns: torch.Tensor | None = None  # (N, T-1)
    kl: torch.Tensor | None = None  # (N, T-1) log π − log π_ref
    non_score_reward: torch.Tensor | None = None  # (N, T-1) −kl_coef · kl
    rewards: torch.Tensor | None = None  # (N, T-1) non-score reward + score at the last token

    def select(self, rows: torch.Tensor) -> Rollout:
        """Rows of the batch, trimmed to their longest sequence (the grid to one less)."""
        width = int(self.attention_mask[rows].sum(1).max())
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value = value[rows]
                value = value[:, : width - (value.shape[1] != self.input_ids.shape[1])] \
                    if value.dim() == 2 else value
            out[f.name] = value
        return Rollout(**out)


def add_ppo_targets(rollout: Rollout, cfg: PPOConfig) -> Rollout:
    """Per-token rewards (KL penalty + score at the last token), GAE advantages and returns."""
    mask = rollout.mask
    rollout.kl = (rollout.logps - rollout.ref_logps) * mask
    rollout.non_score_reward = -cfg.kl_coef * rollout.kl
    rewards = rollout.non_score_reward + rl.last_token_rewards(rollout.scores, mask)
    if cfg.whiten_rewards:
        rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
    rollout.rewards = rewards
    advantages, rollout.returns = rl.gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    rollout.advantages = rl.masked_whiten(advantages, mask)
    return rollout
