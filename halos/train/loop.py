"""The one training loop every loss shares. It knows what a loss *declares*, never which loss."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict

import torch

from halos.config import TrainConfig
from halos.losses.base import AlignmentLoss, Logps, LossOutput
from halos.losses.functional import means_from_sums
from halos.train.batching import Batch, pack_logps, pack_token_logps
from halos.train.checkpoints import save_checkpoint
from halos.train.dataview import DataView
from halos.train.engine import zero_stage
from halos.train.metrics import MetricsLogger, reduce_mean, reduce_sum
from halos.train.reference import ReferenceLogps
from halos.train.session import Session, resume

# Options whose change makes a checkpoint belong to another run (logging options may change).
RESUME_KEYS = ("model", "data", "loss", "loss_params", "ref_logps", "max_length",
               "max_prompt_length", "max_examples", "packing", "epochs", "max_steps",
               "micro_batch_size", "gradient_accumulation_steps", "learning_rate", "seed",
               "length_bucketing", "lr_schedule", "warmup_steps", "chat_template", "lora_r",
               "lora_alpha", "lora_dropout", "lora_target_modules")


def run_fingerprint(cfg: TrainConfig, world_size: int) -> str:
    keyed = {k: getattr(cfg, k) for k in RESUME_KEYS} | {"world_size": world_size}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, engine, loss: AlignmentLoss, train: DataView, held_out: DataView | None,
                 plan: list[list[list[int]]], cfg: TrainConfig, logger: MetricsLogger,
                 reference: ReferenceLogps | None, session: Session):
        self.engine, self.loss, self.train, self.held_out = engine, loss, train, held_out
        self.plan, self.cfg, self.logger, self.reference = plan, cfg, logger, reference
        self.session = session
        self.zero_stage = zero_stage(session.ds)
        self.rank, self.world = session.rank, session.world
        self.fingerprint = run_fingerprint(cfg, self.world)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train (from the latest checkpoint), evaluate, and save the final step's checkpoint
        before the caller exports: a run whose export failed resumes there and only saves."""
        state = resume(self.engine, self.session, self.fingerprint, self.logger)
        start = int(state["step"])
        if start == len(self.plan) and "final_eval" in state:
            return state["final_eval"]
        last: dict[str, float] = {}
        # from_pretrained returns a model in eval mode, where activation checkpointing (and
        # dropout) do nothing: training steps run in train mode.
        self.engine.train()
        for step in range(start, len(self.plan)):
            last = self._train_step(step)
            done = step + 1
            if done % self.cfg.log_every == 0 or done == len(self.plan):
                self.logger.log(done, last)
            self.logger.advance()
            if self.cfg.eval_every and done % self.cfg.eval_every == 0 and done < len(self.plan):
                self.logger.log(done, self.evaluate(), split="eval")
            if self.cfg.save_every and done % self.cfg.save_every == 0 and done < len(self.plan):
                self.save(done)
        final_eval = self.evaluate()
        self.logger.log(len(self.plan), final_eval, split="eval")
        self.save(len(self.plan), final_eval=final_eval)
        return final_eval

    def save(self, done: int, **extra) -> None:
        save_checkpoint(self.engine, self.session.checkpoints, done,
                        {"step": done, "fingerprint": self.fingerprint, **extra},
                        keep_old=self.cfg.keep_checkpoints)

    def _train_step(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        tokens, grad_norm = 0, float("nan")
        microbatches = self.plan[step][self.rank :: self.world]
        for indices in microbatches:
            batch = self.train.batch(indices)
            out = self.forward(batch)
            loss = out.losses.mean()
            self.engine.backward(loss)
            if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                grad_norm = _grad_norm(self.engine.module)  # ZeRO 1-3 report it themselves
            self.engine.step()
            tokens += batch.real_tokens + (batch.kl.real_tokens if batch.kl is not None else 0)
            for key, value in _scalar_metrics(out, loss).items():
                sums[key] += value / len(microbatches)
        if self.zero_stage > 0:
            grad_norm = _as_float(self.engine.get_global_grad_norm())
        metrics = means_from_sums(reduce_mean(dict(sums)))
        elapsed = reduce_mean({"t": time.perf_counter() - started})["t"]
        metrics.update(lr=self.engine.get_lr()[0], grad_norm=grad_norm,
                       tokens=reduce_sum(tokens), tokens_per_s=reduce_sum(tokens) / elapsed)
        return metrics

    def forward(self, batch: Batch) -> LossOutput:
        """Policy outputs (one forward for chosen+rejected), reference from the file, loss."""
        if batch.desirable is not None:
            batch.desirable = batch.desirable.to(self.engine.device)
        score = self._token_logps if self.loss.token_level else self._sequence_logps
        return self.loss(*score(batch))

    def _run(self, rows: Batch) -> tuple[torch.Tensor, ...]:
        args, kwargs = rows.engine_inputs(self.engine.device)
        return self.engine(*args, **kwargs)

    def _sequence_logps(self, batch: Batch) -> tuple[Logps, Logps | None]:
        """Per-sequence log-probs (and those of KL pairs, without gradient) of policy and
        reference."""
        device = self.engine.device
        kl_sums = kl_counts = None
        if batch.kl is not None:  # first: while nothing of the policy's forward is held
            with torch.no_grad():
                kl_sums, kl_counts = self._run(batch.kl)
        sums, counts = self._run(batch)
        average = self.loss.average_logps
        policy = pack_logps(batch, sums, counts, average, kl_sums, kl_counts)
        reference = None
        if self.reference is not None:
            ref = [t.to(device) for t in self.reference.lookup(batch.keys)]
            ref_kl = ([t.to(device) for t in self.reference.lookup(batch.kl.keys)]
                      if batch.kl is not None else [None, None])
            reference = pack_logps(batch, ref[0], ref[1], average, *ref_kl)
        return policy, reference

    def _token_logps(self, batch: Batch) -> tuple[Logps, Logps | None]:
        """Per-token log-probs (N, T-1) of the policy (with values if the model has a value
        head) and of the reference, on the same mask."""
        logps, mask, *values = self._run(batch)
        policy = pack_token_logps(batch, logps, mask, values[0] if values else None)
        reference = None
        if self.reference is not None:
            reference = pack_token_logps(batch, self.reference.lookup_tokens(batch.keys, mask),
                                         mask)
        return policy, reference

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics over the held-out split, weighted by examples, across ranks."""
        if self.held_out is None or len(self.held_out) == 0:
            return {}
        self.engine.eval()
        size = self.cfg.micro_batch_size
        order = sorted(range(len(self.held_out)), key=self.held_out.lengths().__getitem__)
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        # Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively).
        rounds = math.ceil(len(chunks) / self.world)
        sums: dict[str, float] = defaultdict(float)
        for r in range(rounds):
            i = r * self.world + self.rank
            weight = 1.0 if i < len(chunks) else 0.0
            indices = chunks[min(i, len(chunks) - 1)]
            out = self.forward(self.held_out.batch(indices))
            for key, value in _scalar_metrics(out, out.losses.mean()).items():
                # Sums and counts (groups a batch may lack) add up; means are example-weighted.
                per_batch = key.endswith(("_sum", "_count"))
                sums[key] += weight * value * (1 if per_batch else len(indices))
            sums["_n"] += weight * len(indices)
        self.engine.train()
        totals = {k: reduce_sum(v) for k, v in sorted(sums.items())}
        n = totals.pop("_n")
        means = {k: v if k.endswith(("_sum", "_count")) else v / n for k, v in totals.items()}
        return means_from_sums(means)


def _scalar_metrics(out: LossOutput, loss: torch.Tensor) -> dict[str, float]:
    metrics = {"loss": float(loss.detach())}
    for key, value in out.metrics.items():
        value = value.detach().float()
        metrics[key] = float(value.nanmean()) if value.numel() else float("nan")
    return metrics


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)
