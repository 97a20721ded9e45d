"""One plan row per compute job of a suite: training (sft, align, ppo), reference log-probs and
the evals that run a model (sampling, preference). The jobs and their options come from
`halos.suite` (the same functions the rules call); nothing here re-derives a job list."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from halos.plan import flops as fl
from halos.plan import memory as mem
from halos.plan import tokens as tk
from halos.plan.arch import Arch, model_arch
from halos.plan.hardware import CPU_MFU, DEFAULT_MFU, Device, cpu_device, gpu_device

TRAIN_RULES = ("sft", "align", "ppo")


@dataclass(frozen=True)
class Options:
    gpu: str | None = None  # GPU type of rows without gpu_model (default hardware.DEFAULT_GPU)
    mfu: float = DEFAULT_MFU
    count: bool = True  # count tokens from prepared data when the tokenizer loads


@dataclass
class PlanRow:
    rule: str
    model: str
    dataset: str
    loss: str  # "" for a job of the (model, dataset) pair (ref_logps)
    tokens: tk.Tokens
    flops: float
    device: Device
    devices: int
    hours: float  # wall-clock hours
    memory: mem.Memory | None = None  # training jobs
    fix: str = ""  # the change that makes a row that does not fit fit

    @property
    def device_hours(self) -> float:
        return self.hours * self.devices

    @property
    def fits(self) -> bool:
        return self.memory is None or self.memory.per_gpu <= self.device.memory_bytes


class Planner:
    def __init__(self, suite, options: Options = Options()) -> None:
        self.suite, self.options = suite, options

    # ------------------------------------------------------------------ the jobs
    def plan(self) -> list[PlanRow]:
        rows = [self.train_row(rule, run) for rule, run in training_jobs(self.suite)]
        for model, dataset, base in reference_jobs(self.suite):
            rows.append(self.reference_row(model, dataset, base))
        rows += [row for row in map(self.eval_row, self.suite.runs) if row is not None]
        return rows

    # ------------------------------------------------------------------ hardware
    def device(self, model: str, rule: str) -> tuple[Device, int, float]:
        """(device, how many the job uses, MFU): a training job all its processes on all its
        nodes, ref-logps one node, sampling and evals one process."""
        import halos.suite as hs

        row = self.suite.models[model]
        if not row["gpus"]:
            # The row's memory is per node, shared by its processes.
            memory = (row.get("mem_mb") or _host_memory_mb()) // hs.processes(self.suite, model)
            return cpu_device(hs.threads(self.suite, model), memory), 1, CPU_MFU
        device = gpu_device(row.get("gpu_model") or self.options.gpu)
        count = {"train": hs.world_size(self.suite, model),
                 "ref_logps": hs.processes(self.suite, model)}.get(_kind(rule), 1)
        return device, count, self.options.mfu

    def _row(self, rule: str, run, tokens: tk.Tokens, checkpointing: bool = False,
             **extra) -> PlanRow:
        arch = self.arch(run.model)
        device, count, mfu = self.device(run.model, rule)
        flops = fl.job_flops(arch.params, tokens, checkpointing)
        return PlanRow(rule, run.model, run.dataset, run.loss, tokens, flops, device, count,
                       fl.wall_hours(flops, device.peak_flops, count, mfu), **extra)

    def arch(self, model: str) -> Arch:
        return model_arch(model, self.suite.models[model])

    # ------------------------------------------------------------------ rows
    def train_row(self, rule: str, run) -> PlanRow:
        cfg = job_config(self.suite, run)
        tokens = self.ppo_tokens(run, cfg) if rule == "ppo" else self.train_tokens(run, cfg)
        setup = self.setup(run, cfg)
        memory = mem.estimate(self.arch(run.model), setup)
        row = self._row(rule, run, tokens, cfg.activation_checkpointing, memory=memory)
        if not row.fits:
            row.fix = fitting_change(self.arch(run.model), setup, row.device.memory_bytes)
        return row

    def train_tokens(self, run, cfg) -> tk.Tokens:
        import halos.suite as hs

        world = hs.world_size(self.suite, run.model)
        if self.can_count(run.model, run.dataset):
            return tk.counted_train_tokens(cfg, hs.base_model(self.suite, run.model), world)
        kind, with_kl = _loss_view(cfg.loss)
        examples = tk.example_count(self.suite, run.dataset, kind)
        steps = tk.estimated_steps(examples, cfg.micro_batch_size,
                                   cfg.gradient_accumulation_steps, world, cfg.epochs,
                                   cfg.max_steps)
        return tk.estimated_train_tokens(examples, kind, with_kl, steps, cfg.micro_batch_size,
                                         cfg.gradient_accumulation_steps, world, cfg.max_length)

    def ppo_tokens(self, run, cfg) -> tk.Tokens:
        """Online PPO (estimated: prompts at max_prompt_length, responses at response_length):
        per rollout token, the policy and value model train num_ppo_epochs times; policy,
        value, reference and reward model score it once; the response is generated."""
        import halos.suite as hs

        world = hs.world_size(self.suite, run.model)
        prompts = cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.num_mini_batches
        iterations = cfg.max_steps or max(1, tk.example_count(
            self.suite, run.dataset, "sft") * cfg.epochs // (prompts * world))
        rollouts = iterations * prompts * world
        length = cfg.max_prompt_length + cfg.response_length
        return tk.Tokens(trained=2 * cfg.num_ppo_epochs * rollouts * length,
                         scored=4 * rollouts * length + rollouts * cfg.max_prompt_length,
                         generated=rollouts * cfg.response_length, steps=iterations)

    def reference_row(self, model: str, dataset: str, base: bool) -> PlanRow:
        import halos.suite as hs

        cfg = reference_config(self.suite, model, dataset, base)
        if self.can_count(model, dataset):
            tokens = tk.counted_reference_tokens(cfg, hs.base_model(self.suite, model))
        else:  # every pair's chosen and rejected, plus KL pairs of both halves: train + test
            pairs = tk.example_count(self.suite, dataset, "paired")
            tokens = tk.Tokens(scored=6 * pairs * cfg.max_length)
        rule = "ref_logps_base" if base else "ref_logps"
        return self._row(rule, hs.Run(model, dataset, ""), tokens)

    def eval_row(self, run) -> PlanRow | None:
        """A run's one model-based eval job (`evaluate`; `eval_preference` for a reward model):
        its preference pairs scored and its samples prefilled and generated (lm-eval's requests
        are not counted). None when it counts no token."""
        import halos.suite as hs

        rule, files = hs.eval_job(self.suite, run.loss)
        scored = generated = 0
        if "preference.json" in files:
            scored += 2 * self.suite.eval["preference_examples"] * self.suite.datasets[
                run.dataset]["max_length"]
        if "samples.jsonl" in files:
            sample = self.suite.eval["sample"]
            scored += sample["n"] * self.suite.datasets[run.dataset]["max_prompt_length"]
            generated += sample["n"] * sample["max_new_tokens"]
        if not scored + generated:
            return None
        return self._row(rule, run, tk.Tokens(scored=scored, generated=generated))

    def setup(self, run, cfg) -> mem.Setup:
        import halos.suite as hs

        row = self.suite.models[run.model]
        online = cfg.loss == hs.ONLINE_PPO_CLASS
        kind = "sft" if online else _loss_view(cfg.loss)[0]
        bf16 = row["gpus"] > 0 and cfg.precision != "fp32"
        length = cfg.max_prompt_length + cfg.response_length if online else cfg.max_length
        return mem.Setup(cfg.deepspeed, hs.processes(self.suite, run.model), row["nodes"],
                         cfg.micro_batch_size, tk.SEQUENCES[kind], length,
                         cfg.activation_checkpointing, cfg.logits_chunk_size,
                         bytes_per_value=2 if bf16 else 4, on_gpu=row["gpus"] > 0,
                         models=2 if online else 1,
                         frozen_models=2 if online else 0, lora_rank=cfg.lora_r)

    def can_count(self, model: str, dataset: str) -> bool:
        """Tokens are counted when asked, the data is prepared and the tokenizer loads."""
        import halos.suite as hs

        if not self.options.count or not (Path(hs.data_dir(dataset)) / "train.jsonl").is_file():
            return False
        try:
            tk.load_tokenizer(hs.base_model(self.suite, model))
        except (OSError, ValueError):
            return False
        return True


# ---------------------------------------------------------------------------- job options


def training_jobs(suite) -> list[tuple[str, object]]:
    """(rule, run) of every training job: each run's own, the SFT stage its row starts from,
    and the reward model an online PPO row trains against."""
    import halos.suite as hs

    jobs: dict = {}
    for run in suite.runs:
        if suite.losses[run.loss]["from_sft"]:
            jobs[("sft", hs.Run(run.model, run.dataset, hs.SFT))] = None
        if suite.is_online(run.loss):
            reward = hs.Run(run.model, run.dataset, suite.losses[run.loss]["reward_model"])
            jobs[("align", reward)] = None
        rule = "sft" if run.loss == hs.SFT else "ppo" if suite.is_online(run.loss) else "align"
        jobs[(rule, run)] = None
    order = list(suite.models)  # the models table's order (smallest first in ours)
    return sorted(jobs, key=lambda job: (order.index(job[1].model), job[1].dataset,
                                         TRAIN_RULES.index(job[0]), job[1].loss))


def reference_jobs(suite) -> list[tuple[str, str, bool]]:
    import halos.suite as hs

    jobs = {}  # online PPO rows have one too: their preference eval reads it
    for run in suite.runs:
        if hs.reference_file(suite, run.model, run.dataset, run.loss):
            jobs[(run.model, run.dataset, not suite.losses[run.loss]["from_sft"])] = None
    order = list(suite.models)
    return sorted(jobs, key=lambda job: (order.index(job[0]), job[1:]))


def job_config(suite, run):
    """The TrainConfig (PPOConfig) of a training job, from the options its rule passes."""
    import halos.suite as hs
    from halos.config import PPOConfig, TrainConfig

    lrow = suite.losses[run.loss]
    options = hs.train_options(suite, run.model, run.dataset, run.loss)
    options.update(model=hs.start_model(suite, run.model, run.dataset, run.loss),
                   data=hs.data_dir(run.dataset), out=suite.run_dir(run))
    if suite.is_online(run.loss):
        options.update(lrow["params"])
        return _config(PPOConfig, options)
    options.update(loss=lrow["class"], loss_params=lrow["params"])
    return _config(TrainConfig, options)


def reference_config(suite, model: str, dataset: str, base: bool):
    import halos.suite as hs
    from halos.config import TrainConfig

    options = {"model": hs.base_model(suite, model), "data": hs.data_dir(dataset), "out": "-",
               **hs.data_options(suite, model, dataset), **hs.system_options(suite, model),
               "micro_batch_size": suite.models[model]["micro_batch_size"]}
    return _config(TrainConfig, options)


def _config(cls, options: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names})


def _loss_view(loss: str) -> tuple[str, bool]:
    """(batch kind, KL pairs?) of a loss class."""
    from halos.losses import get_loss_class

    cls = get_loss_class(loss)
    return cls.batch_kind, cls.needs_kl_pairs


def _host_memory_mb() -> int:
    """This machine's memory: what a CPU row without mem_mb may use."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def _kind(rule: str) -> str:
    return "train" if rule in TRAIN_RULES else "ref_logps" if rule.startswith("ref_logps") else rule


# ---------------------------------------------------------------------------- fitting


def fitting_change(arch: Arch, setup: mem.Setup, capacity: int) -> str:
    """The first change (one column of the row, or activation checkpointing plus one) whose
    estimate fits `capacity`, described as the row's edit; or what is left to try."""
    for describe, changed in _candidates(setup):
        memory = mem.estimate(arch, changed)
        if memory.per_gpu <= capacity:
            return f"{describe} → {memory.per_gpu / 2**30:.1f} GB"
    return "no single change fits: add nodes with zero3_offload and micro_batch_size: 1"


def _candidates(setup: mem.Setup):
    bases = [("", setup)]
    if not setup.activation_checkpointing:
        ckpt = setup.but(activation_checkpointing=True)
        yield "train: {activation_checkpointing: true}", ckpt
        bases.append(("train: {activation_checkpointing: true}, ", ckpt))
    for prefix, base in bases:
        micro = base.micro_batch // 2
        while micro >= 1:
            yield f"{prefix}micro_batch_size: {micro}", base.but(micro_batch=micro)
            micro //= 2
        stages = mem.STAGES
        later = stages[stages.index(base.deepspeed) + 1:] if base.deepspeed in stages else []
        for stage in later:
            yield f"{prefix}deepspeed: {stage}", base.but(deepspeed=stage)
        for nodes in (2, 4, 8, 16):
            if nodes > base.nodes:
                yield f"{prefix}nodes: {nodes}", base.but(nodes=nodes)
