"""`halos ppo`: online PPO (RLHF) with four models, on the one DeepSpeed core.

The policy (from --model) and the value model (from --value-model, default the reward model)
are trained together in one DeepSpeed engine with one optimizer, as TRL's
PolicyAndValueWrapper: one atomic checkpoint, one ZeRO-3 consolidation. The reference policy and
the reward model are frozen: plain eval-mode modules under ZeRO 0-2, inference engines (sharded
across processes, not replicated) under ZeRO-3, as TRL's `prepare_deepspeed`.

One iteration follows TRL's PPO trainer ("PPOv2"), with the maths of `halos.rl.ppo_math`:
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

import hashlib
import json
import time
from pathlib import Path

import torch

from halos.config import ONLINE_PPO, PPO_MODEL_OPTIONS, PPOConfig, ppo_hyperparameters
from halos.files import keep_json_lines_up_to
from halos.models.generation import SEED_STRIDE, generate_ids
from halos.plan.peak import peak_memory
from halos.rl import ppo_math as rl
from halos.rl.models import PolicyAndValue, SampledTokenLogps, frozen, load_lm, load_value_model
from halos.rl.rollout import (
    Prompts,
    Rollout,
    Schedule,
    add_ppo_targets,
    held_out_prompts,
    make_schedule,
    rollout_prompts,
    train_prompts,
)
from halos.suite.paths import MODEL_DIR
from halos.train import engine as eng
from halos.train import lora
from halos.train.batching import collate
from halos.train.checkpoints import consolidated_state_dict, save_checkpoint
from halos.train.loop import run_fingerprint as training_fingerprint
from halos.train.metrics import MetricsLogger, reduce_mean, reduce_sum
from halos.train.session import (
    Session,
    check_fits,
    check_space,
    finish_run,
    open_logger,
    resume,
    start_run,
)

VALUE_MODEL, SAMPLES_FILE = "value_model", "samples.jsonl"
VALUE_ADAPTER = "value_adapter"  # with --lora-r and --lora-value-model, beside adapter/
# Logging only: changing it does not make a checkpoint belong to another run.
NOT_RESUME_KEYS = ("num_sample_generations",)


class OnlinePPO:
    """The loop: rollouts, PPO epochs, metrics, sample generations, checkpoints, export."""

    def __init__(self, engine, reference, reward, tokenizer, cfg: PPOConfig,
                 schedule: Schedule, logger: MetricsLogger, session: Session) -> None:
        self.engine, self.reference, self.reward = engine, reference, reward
        self.tokenizer, self.cfg, self.schedule, self.logger, self.session = (
            tokenizer, cfg, schedule, logger, session)
        self.ds, self.rank, self.world = session.ds, session.rank, session.world
        self.device = engine.device
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        # ZeRO-3 processes gather weights together: all keep generating until all are done.
        self.synced_gpus = eng.zero_stage(self.ds) == 3 and self.world > 1
        self.out = session.out
        self.fingerprint = run_fingerprint(cfg, self.world)

    # ------------------------------------------------------------------ loop
    def fit(self, prompts: Prompts, held_out: Prompts | None) -> dict[str, float]:
        state, began = self.resume(), time.time()
        start = int(state["step"])
        if start == self.schedule.iterations and "final_eval" in state:
            return state["final_eval"]  # trained: only the export is left
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
                self.save(done)
        self.save(self.schedule.iterations, final_eval=final)  # a failed export only re-saves
        return final

    def save(self, done: int, **extra) -> None:
        save_checkpoint(self.engine, self.session.checkpoints, done,
                        {"step": done, "fingerprint": self.fingerprint, **extra},
                        keep_old=self.cfg.keep_checkpoints)

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
    def resume(self) -> dict:
        state = resume(self.engine, self.session, self.fingerprint, self.logger, "iteration")
        step = int(state["step"])
        if step and self.rank == 0:  # samples of iterations after the checkpoint are sampled again
            keep_json_lines_up_to(self.out / SAMPLES_FILE, step)
        return state

    def export(self, summary: dict) -> None:
        """The policy as a causal-LM folder (`model/`), the value model beside it with its head
        (LoRA: merged, and the adapters in `adapter/` and `value_adapter/`)."""
        state = consolidated_state_dict(self.engine, self.ds)
        module, extra = self.engine.module, {"halos_training.json": summary}
        lora.export_model(module.value, _substate(state, "value."), self.tokenizer,
                          self.out / VALUE_MODEL, extra, self.session.checkpoints,
                          adapter=self.out / VALUE_ADAPTER)
        lora.export_model(module.policy, _substate(state, "policy."), self.tokenizer,
                          self.out / MODEL_DIR, extra, self.session.checkpoints)


def _substate(state: dict[str, torch.Tensor] | None, prefix: str) -> dict | None:
    if state is None:
        return None
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def run_fingerprint(cfg: PPOConfig, world_size: int) -> str:
    """The training options' fingerprint plus the other models and the PPO hyperparameters."""
    keys = [*PPO_MODEL_OPTIONS, *(k for k in ppo_hyperparameters() if k not in NOT_RESUME_KEYS)]
    keyed = {"training": training_fingerprint(cfg, world_size)} | {k: getattr(cfg, k) for k in keys}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the command
def ppo(cfg: PPOConfig) -> Path:
    """Train the policy of `cfg.model` with online PPO against `cfg.reward_model`."""
    cfg.validate()
    session = start_run(cfg)
    ds = session.ds
    policy_lm, tokenizer = eng.load_causal_lm(cfg.model, ds, chat_template=cfg.chat_template,
                                              attn_implementation=cfg.attn_implementation)
    check_fits(policy_lm, cfg)
    check_space(policy_lm, session.out, session.rank)
    check_fits(policy_lm, cfg, cfg.max_prompt_length + cfg.response_length,
               f"--max-prompt-length {cfg.max_prompt_length} + --response-length "
               f"{cfg.response_length}")
    prompts, held_out = train_prompts(cfg, tokenizer), held_out_prompts(cfg, tokenizer)
    schedule = make_schedule(cfg, len(prompts.ids), session.world)
    value = load_value_model(cfg.value_model or cfg.reward_model, ds, tokenizer,
                             "value_model" if cfg.value_model else "reward_model")
    if cfg.lora_value_model:
        value.model = lora.wrap(value.model, cfg, base=cfg.value_model or cfg.reward_model)
    policy = SampledTokenLogps(lora.wrap(policy_lm, cfg), cfg.logits_chunk_size, cfg.temperature)
    trained = PolicyAndValue(policy, value)
    if cfg.activation_checkpointing:
        trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = eng.build_engine(trained, ds, cfg, total_steps=schedule.optimizer_steps(cfg))
    reference_lm = load_lm(cfg.ref_model or cfg.model, ds, tokenizer, "ref_model")
    reference = frozen(SampledTokenLogps(reference_lm, cfg.logits_chunk_size, cfg.temperature),
                       ds, engine.device)
    reward = frozen(load_value_model(cfg.reward_model, ds, tokenizer, "reward_model"), ds,
                    engine.device)
    logger = open_logger(cfg, session, schedule.iterations)
    runner = OnlinePPO(engine, reference, reward, tokenizer, cfg, schedule, logger, session)
    final_eval = runner.fit(prompts, held_out)

    runner.export({"config": cfg.to_dict(), "loss": ONLINE_PPO, "steps": schedule.iterations,
                   "episodes": schedule.iterations * schedule.batch, "world_size": session.world,
                   "final_eval": final_eval, "peak_memory": peak_memory()})
    finish_run(cfg, session, logger)
    return session.final
