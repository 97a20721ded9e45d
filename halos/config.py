"""The run configuration: one typed dataclass, settable from YAML and from the command line.

Every field carries its help text; `halos <command> --help` is generated from this file, and a YAML
file given with `--config` may set any field (unknown keys are an error naming the key). Values
on the command line override the YAML file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from halos.models import VALUE_HEAD_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED_CONFIG_DIR = REPO_ROOT / "configs" / "deepspeed"


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train
    model: str = _opt("", "Hugging Face id or local folder of the model to start from", required=True)
    data: str = _opt("", "prepared dataset folder (train.jsonl, test.jsonl[, sft.jsonl])", required=True)
    out: str = _opt("", "output folder: model/, metrics.jsonl, checkpoints/", required=True)
    loss: str = _opt("dpo", "loss name from the registry (halos losses lists them)")
    loss_params: dict = _opt({}, "loss hyperparameters, e.g. {beta: 0.1}; on the CLI use --<name>")
    ref_logps: str = _opt("", "reference log-probs file from `halos ref-logps` (reference-based losses)")
    reference_model: str = _opt("", "checkpoint the --ref-logps file must come from (default: --model)")
    chat_template: str = _opt("", "chat template name or Jinja text overriding the tokenizer's")
    ref_views: str = _opt("paired,unpaired", "ref-logps: which views of the data to score "
                          "(paired pairs; unpaired completions + KTO's mismatched KL pairs)")
    ref_splits: str = _opt("train,test", "ref-logps: which splits to score (test: every row)")
    # --- data
    max_length: int = _opt(512, "maximum prompt+response tokens per sequence")
    max_prompt_length: int = _opt(256, "prompts are left-truncated to this many tokens first")
    max_examples: int = _opt(0, "use at most this many training examples (0 = all)")
    eval_examples: int = _opt(256, "held-out examples for the periodic eval (0 = none)")
    on_error: str = _opt("raise", "bad data rows: 'raise' (error naming file:line) or 'skip' (counted)",
                         choices=["raise", "skip"])
    length_bucketing: bool = _opt(True, "group sequences of similar length into microbatches (less padding)")
    # --- optimisation
    epochs: int = _opt(1, "passes over the training data")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0 = epochs decide)")
    micro_batch_size: int = _opt(4, "examples (pairs for paired losses) per process per forward")
    gradient_accumulation_steps: int = _opt(1, "microbatches accumulated per optimizer step")
    learning_rate: float = _opt(5e-6, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay, on matrices only")
    adam_betas: list = _opt([0.9, 0.999], "AdamW betas")
    warmup_steps: float = _opt(0.1, "linear warmup steps; a value < 1 is a fraction of all steps")
    lr_schedule: str = _opt("cosine", "decay after warmup", choices=["cosine", "linear", "constant"])
    max_grad_norm: float = _opt(1.0, "gradient clipping by global norm (0 = off)")
    seed: int = _opt(0, "seed for init, data order and sampling")
    # --- system
    deepspeed: str = _opt("zero2", "DeepSpeed config: a name in configs/deepspeed/ or a JSON path")
    precision: str = _opt("auto", "'auto' = bf16 where the GPU supports it, fp32 on CPU",
                          choices=["auto", "bf16", "fp32"])
    activation_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    logits_chunk_size: int = _opt(1024, "rows of the LM head computed at once (memory vs speed)")
    # --- logging and checkpoints
    log_every: int = _opt(1, "write a metrics line every N optimizer steps")
    eval_every: int = _opt(0, "evaluate on held-out data every N steps (0 = only at the end)")
    save_every: int = _opt(0, "resumable checkpoint every N steps (0 = none)")
    keep_checkpoints: bool = _opt(False, "keep the resumable checkpoints after the final save")
    tensorboard: bool = _opt(False, "also log to TensorBoard (out/tensorboard)")
    wandb: bool = _opt(False, "also log to Weights & Biases (needs `pip install wandb` and login)")
    wandb_project: str = _opt("halos", "W&B project")
    run_name: str = _opt("", "name shown in W&B and the logs (default: the output folder)")
    progress: bool = _opt(True, "show a progress bar")
    overwrite: bool = _opt(False, "replace an output folder that already holds a finished model")

    def validate(self) -> None:
        """Fail before any work with errors that name the option."""
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        positive = ("max_length", "max_prompt_length", "micro_batch_size",
                    "gradient_accumulation_steps", "epochs", "logits_chunk_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be smaller than "
                              f"--max-length ({self.max_length}) to leave room for the response")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        for name in ("on_error", "lr_schedule", "precision"):
            choices = _FIELDS[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {choices}, "
                                  f"got {getattr(self, name)!r}")
        if not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data!r} is not a folder; prepare it with `halos data prepare`")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A bad option or config file; the message names the option and what to do."""


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

ONLINE_PPO = "online_ppo"  # what an online PPO run is called where a loss name is expected
# The models of `halos ppo` beside --model (the policy's start).
PPO_MODEL_OPTIONS = ("reward_model", "ref_model", "value_model")
# Training options `halos ppo` does not take: it has no loss, no reference file, no held-out
# loss to evaluate and no length-bucketed data plan (its batches are rollouts).
PPO_UNUSED_OPTIONS = ("loss", "loss_params", "ref_logps", "reference_model", "ref_views",
                      "ref_splits", "length_bucketing", "eval_every", "eval_examples")


@dataclass
class PPOConfig(TrainConfig):
    """`halos ppo`: online PPO (RLHF). The training options above plus the four models and the
    PPO hyperparameters, with the names and defaults of the seed and of TRL's PPO trainer.

    A rollout batch is micro_batch_size × gradient_accumulation_steps × num_mini_batches prompts
    per process; each mini-batch (micro × accumulation) is one optimizer step.
    """

    loss: str = _opt(ONLINE_PPO, "fixed: online PPO")
    epochs: int = _opt(1, "passes over the unique training prompts (unless --total-episodes)")
    max_steps: int = _opt(0, "stop after this many PPO iterations (0 = the episodes decide)")
    micro_batch_size: int = _opt(4, "rollouts per process per forward and backward")
    log_every: int = _opt(1, "write a metrics line every N iterations")
    save_every: int = _opt(0, "resumable checkpoint every N iterations (0 = none)")
    learning_rate: float = _opt(3e-6, "peak learning rate (AdamW) of the policy and value models")
    warmup_steps: float = _opt(0.0, "linear warmup steps; a value < 1 is a fraction of all steps")
    lr_schedule: str = _opt("linear", "decay after warmup", choices=["cosine", "linear", "constant"])
    # --- the other three models
    reward_model: str = _opt("", "reward model folder (`halos align --loss rm`: value_head.safetensors)",
                             required=True)
    ref_model: str = _opt("", "frozen reference policy of the KL penalty (default: --model)")
    value_model: str = _opt("", "start of the value model, trained alongside (default: --reward-model)")
    # --- rollouts
    response_length: int = _opt(53, "maximum new tokens of a sampled response (it stops at EOS)")
    temperature: float = _opt(0.7, "sampling temperature of the rollouts (their log-probs use it too)")
    missing_eos_penalty: float = _opt(0.0, "subtracted from the score of a response without EOS")
    local_rollout_forward_batch_size: int = _opt(64, "sequences per generation / rollout forward")
    total_episodes: int = _opt(0, "rollouts in all (0 = epochs × unique training prompts)")
    num_sample_generations: int = _opt(10, "times held-out completions are sampled into "
                                       "samples.jsonl during training (0 = never)")
    # --- PPO
    num_ppo_epochs: int = _opt(4, "passes over each rollout batch")
    num_mini_batches: int = _opt(1, "optimizer steps per pass over a rollout batch")
    whiten_rewards: bool = _opt(False, "normalize the per-token rewards (scale only)")
    kl_coef: float = _opt(0.05, "weight of the per-token KL penalty against the reference")
    cliprange: float = _opt(0.2, "clip range of the policy ratio")
    vf_coef: float = _opt(0.1, "weight of the value loss")
    cliprange_value: float = _opt(0.2, "clip range of the value predictions")
    gamma: float = _opt(1.0, "discount factor")
    lam: float = _opt(0.95, "GAE lambda")

    def validate(self) -> None:
        super().validate()
        if not self.reward_model:
            raise ConfigError("--reward-model is required (train one with `halos align --loss rm`)")
        for name in PPO_MODEL_OPTIONS:
            folder = getattr(self, name)
            if folder and not Path(folder).is_dir():
                raise ConfigError(f"--{name.replace('_', '-')} {folder!r} is not a model folder")
        if not (Path(self.reward_model) / VALUE_HEAD_FILE).is_file():
            raise ConfigError(f"--reward-model {self.reward_model!r} has no {VALUE_HEAD_FILE}; "
                              f"train a reward model with `halos align --loss rm`")
        for name in ("response_length", "local_rollout_forward_batch_size", "num_ppo_epochs",
                     "num_mini_batches"):
            _check(self, name, getattr(self, name) >= 1, ">= 1")
        for name in ("total_episodes", "num_sample_generations", "kl_coef", "vf_coef",
                     "missing_eos_penalty"):
            _check(self, name, getattr(self, name) >= 0, ">= 0")
        for name in ("temperature", "cliprange", "cliprange_value"):
            _check(self, name, getattr(self, name) > 0, "> 0")
        for name in ("gamma", "lam"):
            _check(self, name, 0 <= getattr(self, name) <= 1, "in [0, 1]")


def _check(cfg: TrainConfig, name: str, ok: bool, wanted: str) -> None:
    if not ok:
        raise ConfigError(f"--{name.replace('_', '-')} must be {wanted}, got {getattr(cfg, name)!r}")


def ppo_hyperparameters() -> dict[str, Any]:
    """The options PPO adds to the training options (a losses-table row's `params`), with their
    defaults; the models are columns of their own."""
    base = set(_FIELDS) | set(PPO_MODEL_OPTIONS)
    return {f.name: f.default for f in dataclasses.fields(PPOConfig) if f.name not in base}


def load_yaml_config(path: str | Path, config: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """Read a YAML run config; unknown keys are an error naming the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; valid options are {sorted(fields)}")
    return values


def resolve_deepspeed_config(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    named = DEEPSPEED_CONFIG_DIR / f"{name_or_path}.json"
    if named.is_file():
        return named
    choices = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"--deepspeed {name_or_path!r}: not a JSON file nor one of {choices}")
