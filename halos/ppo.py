"""`halos ppo`: online PPO (RLHF) with four models, on the one DeepSpeed core.

The policy (from --model) and the value model (from --value-model, default the reward model)
are trained together in one DeepSpeed engine with one optimizer, as TRL's
PolicyAndValueWrapper: one atomic checkpoint, one ZeRO-3 consolidation. The reference policy and
the reward model are frozen: plain eval-mode modules under ZeRO 0-2, inference engines (sharded
across processes, not replicated) under ZeRO-3, as TRL's `prepare_deepspeed`.

One iteration follows TRL's PPO trainer ("PPOv2"), with the maths of `halos.rl`:
  1. rollout: sample a response to each prompt of the batch (seeded, at most response_length
     tokens, cut after the first EOS); score it with the reward model at its last token
     (minus missing_eos_penalty without EOS); per-token log-probs of policy and reference and
     values of the value model, in chunks of local_rollout_forward_batch_size;
  2. rewards: −kl_coef·(log π − log π_ref) per token (k1), plus the score at the last token;
     GAE advantages (whitened) and returns;
  3. num_ppo_epochs passes over shuffled mini-batches of the rollout batch: clipped policy loss
     plus vf_coef × clipped value loss, one optimizer step per mini-batch.
Metrics keep TRL's names (objective/kl, policy/clipfrac_avg, loss/value_avg, ...).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from halos import engine as eng
from halos import rl
from halos.batching import collate
from halos.config import ONLINE_PPO, PPO_MODEL_OPTIONS, ConfigError, PPOConfig, ppo_hyperparameters
from halos.metrics import MetricsLogger, reduce_mean, reduce_sum
from halos.ops import CausalLMLogps, backbone_hidden, chunk_starts, token_logps_from_hidden
from halos.value_head import VALUE_HEAD_FILE, ValueHeadModel, load_value_head

FINAL_MODEL, VALUE_MODEL, SAMPLES_FILE = "model", "value_model", "samples.jsonl"
SEED_STRIDE = 1_000_003
# Logging only: changing it does not make a checkpoint belong to another run.
NOT_RESUME_KEYS = ("num_sample_generations",)


# ----------------------------------------------------------------------------- models
class _Tempered(nn.Module):
    """The LM head with its logits divided by the sampling temperature."""

    def __init__(self, head: nn.Module, temperature: float) -> None:
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) / self.temperature


class SampledTokenLogps(CausalLMLogps):
    """A causal LM whose forward returns the log-probs of the scored tokens on the (N, T-1) grid
    of `halos.ops.token_logps_from_hidden`, from logits divided by `temperature` (as sampled),
    and, when asked, the mean entropy of the distributions at those positions."""

    def __init__(self, model: nn.Module, chunk_size: int, temperature: float) -> None:
        super().__init__(model, chunk_size)
        self.temperature = temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = backbone_hidden(self.model, input_ids, attention_mask)  # (N, T, H)
        head = self.model.get_output_embeddings()
        if self.temperature != 1.0:
            head = _Tempered(head, self.temperature)
        grid, scored = token_logps_from_hidden(hidden, input_ids, loss_mask, head, self.chunk_size)
        if not with_entropy:
            return grid.float(), None
        return grid.float(), _mean_entropy(hidden[:, :-1][scored].detach(), head, self.chunk_size)


@torch.no_grad()
def _mean_entropy(hidden: torch.Tensor, head: nn.Module, chunk_size: int) -> torch.Tensor:
    """Mean entropy of softmax(head(h)) over the rows of `hidden` (M, H), `chunk_size` at once."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in chunk_starts(hidden.shape[0], chunk_size, head):
        logps = torch.log_softmax(head(hidden[start : start + chunk_size]).float(), dim=-1)
        total += -(logps.exp() * logps).sum()
    return total / max(1, hidden.shape[0])


class PolicyAndValue(nn.Module):
    """The two trained models in one module: one engine, optimizer, checkpoint and export."""

    def __init__(self, policy: SampledTokenLogps, value: ValueHeadModel) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Policy log-probs, values (both (N, T-1) float32) and the policy's mean entropy."""
        logps, entropy = self.policy(input_ids, attention_mask, loss_mask, with_entropy)
        return logps, self.value.token_values(input_ids, attention_mask), entropy

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.policy.model.gradient_checkpointing_enable(**kwargs)
        self.value.gradient_checkpointing_enable(**kwargs)


def load_lm(path: str, ds: dict, tokenizer, option: str) -> nn.Module:
    """A causal LM (ZeRO-3: loaded sharded) whose tokenizer must be the policy's."""
    model, other = eng.load_causal_lm(path, ds)
    if other.get_vocab() != tokenizer.get_vocab() or other.eos_token_id != tokenizer.eos_token_id:
        raise ConfigError(f"--{option.replace('_', '-')} {path!r}: its tokenizer differs from "
                          f"--model's; the four PPO models must share one tokenizer")
    return model


def load_value_model(path: str, ds: dict, tokenizer, option: str) -> ValueHeadModel:
    """LM + value head from `path` (a new head if the folder has none)."""
    model = load_lm(path, ds, tokenizer, option)
    head = None
    if (Path(path) / VALUE_HEAD_FILE).is_file():
        head = load_value_head(path).to(dtype=next(model.parameters()).dtype)
    return ValueHeadModel(model, head)


def frozen(module: nn.Module, ds: dict, device: torch.device):
    """A model that is never trained: under ZeRO-3 an inference engine (sharded, no optimizer),
    else a plain eval-mode module on the device."""
    module.requires_grad_(False)
    if eng.zero_stage(ds) == 3:
        return eng.build_engine(module, copy.deepcopy(ds), None)
    return module.to(device).eval()


# ----------------------------------------------------------------------------- prompts
@dataclass
class Prompts:
    messages: list[list[dict]]
    ids: list[list[int]]


def encode(messages: list[list[dict]], cfg: PPOConfig, tokenizer) -> Prompts:
    """Token ids with the generation prompt, exactly as `halos sample` will render them."""
    from halos.eval.sample import encode_prompts

    info = {"config": {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                       "chat_template": cfg.chat_template}}
    return Prompts(messages, encode_prompts(messages, tokenizer, info))


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
    from halos.data.prepare import read_rows
    from halos.eval.sample import read_prompt_rows

    if not cfg.num_sample_generations:
        return None
    data, n = Path(cfg.data), cfg.local_rollout_forward_batch_size
    if (data / "prompts.jsonl").is_file():
        rows = read_prompt_rows(data / "prompts.jsonl")
    elif (data / "test.jsonl").is_file():
        rows = read_rows(data / "test.jsonl", on_error=cfg.on_error)
    else:
        return None
    messages = unique([r["prompt"] for r in rows])[:n]
    return encode(messages, cfg, tokenizer) if messages else None


# ----------------------------------------------------------------------------- schedule
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


# ----------------------------------------------------------------------------- rollouts
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


class OnlinePPO:
    """The loop: rollouts, PPO epochs, metrics, sample generations, checkpoints, export."""

    def __init__(self, engine, reference, reward, tokenizer, cfg: PPOConfig,
                 schedule: Schedule, logger: MetricsLogger, ds: dict) -> None:
        self.engine, self.reference, self.reward = engine, reference, reward
        self.tokenizer, self.cfg, self.schedule, self.logger, self.ds = (
            tokenizer, cfg, schedule, logger, ds)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) \
            if dist.is_initialized() else (0, 1)
        self.device = engine.device
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        # ZeRO-3 processes gather weights together: all keep generating until all are done.
        self.synced_gpus = eng.zero_stage(ds) == 3 and self.world > 1
        self.out = Path(cfg.out)
        self.checkpoints = self.out / "checkpoints"
        self.fingerprint = run_fingerprint(cfg, self.world)

    # ------------------------------------------------------------------ loop
    def fit(self, prompts: Prompts, held_out: Prompts | None) -> dict[str, float]:
        start, began = self.resume(), time.time()
        final: dict[str, float] = {}
        if held_out is not None and start == 0:
            final = self.log_samples(0, held_out)
        for iteration in range(start, self.schedule.iterations):
            done = iteration + 1
            metrics = self.iteration(iteration, prompts)
            metrics["eps"] = (done - start) * self.schedule.batch / (time.time() - began)
            last = done == self.schedule.iterations
            if done % self.cfg.log_every == 0 or last:
                self.logger.log(done, metrics)
            self.logger.advance()
            if held_out is not None and (done % self.schedule.sample_every == 0 or last):
                final = self.log_samples(done, held_out)
            if self.cfg.save_every and done % self.cfg.save_every == 0 and not last:
                eng.save_checkpoint(self.engine, self.checkpoints, done,
                                    {"step": done, "fingerprint": self.fingerprint})
        return final

    def iteration(self, iteration: int, prompts: Prompts) -> dict[str, float]:
        indices = rollout_prompts(self.schedule, len(prompts.ids), iteration, self.rank,
                                  self.cfg.seed)
        torch.manual_seed(self.cfg.seed * SEED_STRIDE + iteration * self.world + self.rank)
        rollout = add_ppo_targets(self.rollout([prompts.ids[i] for i in indices]), self.cfg)
        generator = torch.Generator().manual_seed(self.cfg.seed * SEED_STRIDE + iteration)
        stats = [s for _ in range(self.cfg.num_ppo_epochs)
                 for s in self.update_epoch(rollout, generator)]
        return self.metrics(rollout, stats, iteration)

    # ------------------------------------------------------------------ rollout
    def rollout(self, prompt_ids: list[list[int]]) -> Rollout:
        self.engine.eval()
        responses = self.generate(prompt_ids, self.cfg.temperature)
        batch = collate(list(zip(prompt_ids, responses, strict=True)), self.pad, "sft",
                        len(responses))
        ids, attention, loss_mask = (t.to(self.device) for t in
                                     (batch.input_ids, batch.attention_mask, batch.loss_mask))
        logps, values, ref_logps, scores = self.score(ids, attention, loss_mask)
        self.engine.train()
        has_eos = torch.tensor([r[-1] == self.eos for r in responses], device=self.device)
        scores = scores - self.cfg.missing_eos_penalty * (~has_eos).float()
        return Rollout(ids, attention, loss_mask, loss_mask[:, 1:], logps, ref_logps, values,
                       scores, has_eos)

    def generate(self, prompt_ids: list[list[int]], temperature: float) -> list[list[int]]:
        """Responses (token ids up to and including the first EOS) in chunks of
        local_rollout_forward_batch_size; temperature 0 is greedy."""
        from halos.eval.sample import generate_ids

        chunk = self.cfg.local_rollout_forward_batch_size
        policy = self.engine.module.policy.model
        responses = []
        for start in range(0, len(prompt_ids), chunk):
            responses += generate_ids(policy, prompt_ids[start : start + chunk], eos=self.eos,
                                      pad=self.pad, max_new_tokens=self.cfg.response_length,
                                      temperature=temperature, device=self.device,
                                      synced_gpus=self.synced_gpus)
        return responses

    @torch.no_grad()
    def score(self, ids: torch.Tensor, attention: torch.Tensor, loss_mask: torch.Tensor,
              reward_only: bool = False) -> list[torch.Tensor]:
        """Policy log-probs, values, reference log-probs and reward-model scores of a batch of
        sequences, local_rollout_forward_batch_size rows at a time (only scores if asked)."""
        chunk = self.cfg.local_rollout_forward_batch_size
        parts = []
        for start in range(0, ids.shape[0], chunk):
            rows = (ids[start : start + chunk], attention[start : start + chunk],
                    loss_mask[start : start + chunk])
            scores = self.reward(*rows)[0].float()
            if reward_only:
                parts.append((scores,))
                continue
            logps, values, _ = self.engine(*rows)
            parts.append((logps, values, self.reference(*rows)[0], scores))
        return [torch.cat(p) for p in zip(*parts, strict=True)]

    # ------------------------------------------------------------------ update
    def update_epoch(self, rollout: Rollout, generator: torch.Generator) -> list[dict[str, float]]:
        """One pass over the rollout batch in shuffled mini-batches (one optimizer step each,
        accumulated over micro-batches)."""
        order = torch.randperm(rollout.input_ids.shape[0], generator=generator)
        stats = []
        for start in range(0, len(order), self.schedule.mini):
            minibatch = order[start : start + self.schedule.mini]
            for micro in minibatch.split(self.schedule.micro):
                stats.append(self.train_step(rollout.select(micro.to(self.device))))
        return stats

    def train_step(self, batch: Rollout) -> dict[str, float]:
        cfg = self.cfg
        logps, values, entropy = self.engine(batch.input_ids, batch.attention_mask,
                                             batch.loss_mask, True)
        policy = rl.clipped_policy_loss(logps, batch.logps, batch.advantages, batch.mask,
                                        cfg.cliprange)
        value = rl.clipped_value_loss(values, batch.values, batch.returns, batch.mask,
                                      cfg.cliprange_value)
        self.engine.backward(policy.loss + cfg.vf_coef * value.loss)
        self.engine.step()
        return {"policy/approxkl_avg": float(policy.approxkl),
                "policy/clipfrac_avg": float(policy.clipfrac),
                "loss/policy_avg": float(policy.loss.detach()),
                "loss/value_avg": float(value.loss.detach()),
                "val/clipfrac_avg": float(value.clipfrac),
                "policy/entropy_avg": float(entropy),
                "val/ratio": float(rl.masked_mean(policy.ratio, batch.mask))}

    # ------------------------------------------------------------------ metrics and samples
    def metrics(self, rollout: Rollout, stats: list[dict[str, float]],
                iteration: int) -> dict[str, float]:
        """TRL's metrics of one iteration, averaged over processes (EOS tokens summed)."""
        non_score = rollout.non_score_reward.sum(1).mean()
        ratios = torch.tensor([s["val/ratio"] for s in stats], dtype=torch.float64)
        local = {"objective/kl": float(rollout.kl.sum(1).mean()),
                 "objective/entropy": float((-rollout.logps * rollout.mask).sum(1).mean()),
                 "objective/non_score_reward": float(non_score),
                 "objective/rlhf_reward": float(non_score + rollout.scores.mean()),
                 "objective/scores": float(rollout.scores.mean()),
                 **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
                 "val/ratio_var": float(ratios.var()) if len(stats) > 1 else 0.0}
        metrics = reduce_mean(local)
        metrics.update({"val/num_eos_tokens": reduce_sum(float(rollout.has_eos.sum())),
                        "lr": self.engine.get_lr()[0],
                        "episode": (iteration + 1) * self.schedule.batch})
        return metrics

    def log_samples(self, step: int, held_out: Prompts) -> dict[str, float]:
        """Greedy completions of the held-out prompts and their reward-model scores: appended
        to samples.jsonl and logged as split "eval"."""
        self.engine.eval()
        responses = self.generate(held_out.ids, temperature=0.0)
        batch = collate(list(zip(held_out.ids, responses, strict=True)), self.pad, "sft",
                        len(responses))
        (scores,) = self.score(batch.input_ids.to(self.device),
                               batch.attention_mask.to(self.device),
                               batch.loss_mask.to(self.device), reward_only=True)
        self.engine.train()
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        if self.rank == 0:
            with (self.out / SAMPLES_FILE).open("a") as handle:
                for prompt, text, score in zip(held_out.messages, texts, scores.tolist(),
                                               strict=True):
                    handle.write(json.dumps({"step": step, "prompt": prompt, "completion": text,
                                             "score": score}) + "\n")
        metrics = {"score": float(scores.mean()),
                   "eos_rate": sum(r[-1] == self.eos for r in responses) / len(responses)}
        self.logger.log(step, metrics, split="eval")
        return metrics

    # ------------------------------------------------------------------ checkpoints, export
    def resume(self) -> int:
        state = eng.resume_latest(self.engine, self.checkpoints, self.fingerprint)
        if state is None:
            return 0
        step = int(state["step"])
        self.logger.message(f"[halos] resumed from {state['path']} at iteration {step}")
        self.logger.advance(step)
        if self.rank == 0:  # samples of iterations after the checkpoint are sampled again
            _keep_rows(self.out / SAMPLES_FILE, lambda row: row["step"] <= step)
        return step

    def export(self, summary: dict) -> None:
        """The policy as a causal-LM folder (`model/`), the value model beside it with its head."""
        state = eng.consolidated_state_dict(self.engine, self.ds)
        module, extra = self.engine.module, {"halos_training.json": summary}
        eng.export_hf_folder(module.value, _substate(state, "value."), self.tokenizer,
                             self.out / VALUE_MODEL, extra)
        eng.export_hf_folder(module.policy, _substate(state, "policy."), self.tokenizer,
                             self.out / FINAL_MODEL, extra)


def _substate(state: dict[str, torch.Tensor] | None, prefix: str) -> dict | None:
    if state is None:
        return None
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _keep_rows(path: Path, keep) -> None:
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if keep(json.loads(line))]
        path.write_text("".join(line + "\n" for line in rows))


def run_fingerprint(cfg: PPOConfig, world_size: int) -> str:
    """The training options' fingerprint plus the other models and the PPO hyperparameters."""
    from halos.trainer import run_fingerprint as training_fingerprint

    keys = [*PPO_MODEL_OPTIONS, *(k for k in ppo_hyperparameters() if k not in NOT_RESUME_KEYS)]
    keyed = {"training": training_fingerprint(cfg, world_size)} | {k: getattr(cfg, k) for k in keys}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the command
def ppo(cfg: PPOConfig) -> Path:
    """Train the policy of `cfg.model` with online PPO against `cfg.reward_model`."""
    from halos.train import check_fits, start_run

    cfg.validate()
    out = Path(cfg.out)
    final, rank, world, ds = start_run(cfg)

    policy_lm, tokenizer = eng.load_causal_lm(cfg.model, ds)
    check_fits(policy_lm, cfg)
    check_response_fits(policy_lm, cfg)
    prompts, held_out = train_prompts(cfg, tokenizer), held_out_prompts(cfg, tokenizer)
    schedule = make_schedule(cfg, len(prompts.ids), world)
    value = load_value_model(cfg.value_model or cfg.reward_model, ds, tokenizer,
                             "value_model" if cfg.value_model else "reward_model")
    policy = SampledTokenLogps(policy_lm, cfg.logits_chunk_size, cfg.temperature)
    trained = PolicyAndValue(policy, value)
    if cfg.activation_checkpointing:
        trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = eng.build_engine(trained, ds, cfg, total_steps=schedule.optimizer_steps(cfg))
    reference_lm = load_lm(cfg.ref_model or cfg.model, ds, tokenizer, "ref_model")
    reference = frozen(SampledTokenLogps(reference_lm, cfg.logits_chunk_size, cfg.temperature),
                       ds, engine.device)
    reward = frozen(load_value_model(cfg.reward_model, ds, tokenizer, "reward_model"), ds,
                    engine.device)
    logger = MetricsLogger(out, enabled=rank == 0, total_steps=schedule.iterations,
                           run_name=cfg.run_name or out.name, config=cfg.to_dict(),
                           progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                           wandb_project=cfg.wandb_project)
    runner = OnlinePPO(engine, reference, reward, tokenizer, cfg, schedule, logger, ds)
    final_eval = runner.fit(prompts, held_out)

    runner.export({"config": cfg.to_dict(), "loss": ONLINE_PPO, "steps": schedule.iterations,
                   "episodes": schedule.iterations * schedule.batch, "world_size": world,
                   "final_eval": final_eval})
    eng.barrier()
    if rank == 0 and not cfg.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    logger.close()
    return final


def check_response_fits(model: nn.Module, cfg: PPOConfig) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.max_prompt_length + cfg.response_length > limit:
        raise ConfigError(f"--max-prompt-length {cfg.max_prompt_length} + --response-length "
                          f"{cfg.response_length} exceed what {cfg.model} supports "
                          f"(max_position_embeddings = {limit}); lower --response-length")
