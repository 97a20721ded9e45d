"""The run configuration: one typed dataclass, settable from YAML and from the command line.

Every field carries its help text, its type and its range; `halos <command> --help` is generated
from this file, and a YAML file given with `--config` may set any field (unknown keys, and values
of another type or out of range, are errors naming the key). Values on the command line override
the YAML file; `validate()` checks every value again before any work.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halos.files import read_yaml
from halos.models import VALUE_HEAD_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED_CONFIG_DIR = REPO_ROOT / "configs" / "deepspeed"


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A run option. `kw`: required, choices, and the range of a number (or of a list's items):
    minimum (>=), above (>), maximum (<=), below (<); length of a list."""
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
    ref_logps: str = _opt("", "reference log-probs file from `halos ref-logps` (reference-based "
                               "losses; without it the run scores its data with --model before "
                               "its first step, into OUT/ref_logps.pt)")
    reference_model: str = _opt("", "checkpoint the --ref-logps file must come from (default: --model)")
    chat_template: str = _opt("", "chat template name or Jinja text overriding the tokenizer's")
    ref_views: str = _opt("paired,unpaired", "ref-logps: which views of the data to score "
                          "(paired pairs; unpaired completions + KTO's mismatched KL pairs)")
    ref_splits: str = _opt("train,test", "ref-logps: which splits to score (test: every row)")
    # --- data
    max_length: int = _opt(512, "maximum prompt+response tokens per sequence", minimum=1)
    max_prompt_length: int = _opt(256, "prompts are left-truncated to this many tokens first",
                                  minimum=1)
    max_examples: int = _opt(0, "use at most this many training examples (0 = all)", minimum=0)
    eval_examples: int = _opt(256, "held-out examples for the periodic eval (0 = none)", minimum=0)
    on_error: str = _opt("raise", "bad data rows: 'raise' (error naming file:line) or 'skip' (counted)",
                         choices=["raise", "skip"])
    length_bucketing: bool = _opt(True, "group sequences of similar length into microbatches (less padding)")
    # --- optimisation
    epochs: int = _opt(1, "passes over the training data", minimum=1)
    max_steps: int = _opt(0, "stop after this many optimizer steps (0 = epochs decide)", minimum=0)
    micro_batch_size: int = _opt(4, "examples (pairs for paired losses) per process per forward",
                                 minimum=1)
    gradient_accumulation_steps: int = _opt(1, "microbatches accumulated per optimizer step",
                                            minimum=1)
    learning_rate: float = _opt(5e-6, "peak learning rate (AdamW)", above=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay, on matrices only", minimum=0)
    adam_betas: list = _opt([0.9, 0.999], "AdamW betas", length=2, minimum=0, below=1)
    warmup_steps: float = _opt(0.1, "linear warmup steps; a value < 1 is a fraction of all steps",
                               minimum=0)
    lr_schedule: str = _opt("cosine", "decay after warmup", choices=["cosine", "linear", "constant"])
    max_grad_norm: float = _opt(1.0, "gradient clipping by global norm (0 = off)", minimum=0)
    seed: int = _opt(0, "seed for init, data order and sampling", minimum=0)
    # --- system
    deepspeed: str = _opt("zero2", "DeepSpeed config: a name in configs/deepspeed/ or a JSON path")
    precision: str = _opt("auto", "'auto' = bf16 where the GPU supports it, fp32 on CPU",
                          choices=["auto", "bf16", "fp32"])
    activation_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    attn_implementation: str = _opt("sdpa", "attention kernel the model is loaded with "
                                    "(flash_attention_2 needs the flash-attn package and a GPU)",
                                    choices=["sdpa", "eager", "flash_attention_2"])
    packing: bool = _opt(False, "pack each microbatch's sequences into fewer rows, a pair's "
                         "prompt computed once for chosen and rejected (for unpaired losses the "
                         "step plan keeps a pair's two halves together; sdpa/eager attention)")
    logits_chunk_size: int = _opt(1024, "rows of the LM head computed at once (memory vs speed)",
                                  minimum=1)
    # --- LoRA (peft): frozen base weights, trained low-rank adapters (halos/train/lora.py)
    lora_r: int = _opt(0, "LoRA rank (0 = train every weight, no adapters)", minimum=0)
    lora_alpha: float = _opt(16.0, "LoRA scaling alpha (the update is scaled by alpha / rank)",
                             above=0)
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input", minimum=0, below=1)
    lora_target_modules: str = _opt("", "comma-separated module names to adapt, or all-linear "
                                    "('' = the model family's default: every linear projection)")
    # --- logging and checkpoints
    log_every: int = _opt(1, "write a metrics line every N optimizer steps", minimum=1)
    eval_every: int = _opt(0, "evaluate on held-out data every N steps (0 = only at the end)",
                           minimum=0)
    save_every: int = _opt(0, "resumable checkpoint every N steps (0 = none)", minimum=0)
    keep_checkpoints: bool = _opt(False, "keep the resumable checkpoints after the final save")
    tensorboard: bool = _opt(False, "also log to TensorBoard (out/tensorboard)")
    wandb: bool = _opt(False, "also log to Weights & Biases (needs `pip install wandb` and login)")
    wandb_project: str = _opt("halos", "W&B project")
    run_name: str = _opt("", "name shown in W&B and the logs (default: the output folder)")
    progress: bool = _opt(True, "show a progress bar")
    progress_every: float = _opt(30.0, "with --no-progress: seconds between progress lines in "
                                 "the log (step, loss, tokens/s, ETA, peak memory)")
    overwrite: bool = _opt(False, "replace an output folder that already holds a finished model")

    def validate(self) -> None:
        """Fail before any work with errors that name the option: every value of its declared
        type and range, the lengths consistent, the data prepared, the model resolvable."""
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{flag(name)} is required")
        for f in dataclasses.fields(self):
            setattr(self, f.name, checked_option(type(self), f.name, getattr(self, f.name)))
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be smaller than "
                              f"--max-length ({self.max_length}) to leave room for the response")
        if not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data!r} is not a folder; prepare it with `halos data prepare`")
        if self.reference_model and not self.ref_logps:
            raise ConfigError(f"--reference-model {self.reference_model!r} names the checkpoint a "
                              f"--ref-logps file was computed with; pass that file too (without "
                              f"--ref-logps the reference is --model, scored by the run itself)")
        resolve_model(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A bad option or config file; the message names the option and what to do."""


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag(name: str) -> str:
    """The command-line spelling of option `name`."""
    return "--" + name.replace("_", "-")


def _like(name: str, default: Any, help: str) -> Any:
    """A subclass's own default and help for option `name`, keeping its type and range."""
    return _opt(default, help, **{k: v for k, v in _FIELDS[name].metadata.items() if k != "help"})

ONLINE_PPO = "online_ppo"  # what an online PPO run is called where a loss name is expected
# The models of `halos ppo` beside --model (the policy's start).
PPO_MODEL_OPTIONS = ("reward_model", "ref_model", "value_model")
# Training options `halos ppo` does not take: it has no loss, no reference file, no held-out
# loss to evaluate and no length-bucketed or packed data plan (its batches are rollouts).
PPO_UNUSED_OPTIONS = ("loss", "loss_params", "ref_logps", "reference_model", "ref_views",
                      "ref_splits", "length_bucketing", "eval_every", "eval_examples", "packing")


@dataclass
class PPOConfig(TrainConfig):
    """`halos ppo`: online PPO (RLHF). The training options above plus the four models and the
    PPO hyperparameters, with the names and defaults of the seed and of TRL's PPO trainer.

    A rollout batch is micro_batch_size × gradient_accumulation_steps × num_mini_batches prompts
    per process; each mini-batch (micro × accumulation) is one optimizer step.
    """

    loss: str = _opt(ONLINE_PPO, "fixed: online PPO")
    epochs: int = _like("epochs", 1, "passes over the unique training prompts (unless --total-episodes)")
    max_steps: int = _like("max_steps", 0, "stop after this many PPO iterations (0 = the episodes decide)")
    micro_batch_size: int = _like("micro_batch_size", 4, "rollouts per process per forward and backward")
    log_every: int = _like("log_every", 1, "write a metrics line every N iterations")
    save_every: int = _like("save_every", 0, "resumable checkpoint every N iterations (0 = none)")
    learning_rate: float = _like("learning_rate", 3e-6,
                                 "peak learning rate (AdamW) of the policy and value models")
    warmup_steps: float = _like("warmup_steps", 0.0,
                                "linear warmup steps; a value < 1 is a fraction of all steps")
    lr_schedule: str = _like("lr_schedule", "linear", "decay after warmup")
    # --- the other three models
    reward_model: str = _opt("", "reward model folder (`halos align --loss rm`: value_head.safetensors)",
                             required=True)
    ref_model: str = _opt("", "frozen reference policy of the KL penalty (default: --model)")
    value_model: str = _opt("", "start of the value model, trained alongside (default: --reward-model)")
    lora_value_model: bool = _opt(True, "with --lora-r: the value model trains LoRA adapters too "
                                  "(--no-lora-value-model: every weight; its head always trains)")
    # --- rollouts
    response_length: int = _opt(53, "maximum new tokens of a sampled response (it stops at EOS)",
                                minimum=1)
    temperature: float = _opt(0.7, "sampling temperature of the rollouts (their log-probs use it too)",
                              above=0)
    missing_eos_penalty: float = _opt(0.0, "subtracted from the score of a response without EOS",
                                      minimum=0)
    local_rollout_forward_batch_size: int = _opt(64, "sequences per generation / rollout forward",
                                                 minimum=1)
    total_episodes: int = _opt(0, "rollouts in all (0 = epochs × unique training prompts)", minimum=0)
    num_sample_generations: int = _opt(10, "times held-out completions are sampled into "
                                       "samples.jsonl during training (0 = never)", minimum=0)
    # --- PPO
    num_ppo_epochs: int = _opt(4, "passes over each rollout batch", minimum=1)
    num_mini_batches: int = _opt(1, "optimizer steps per pass over a rollout batch", minimum=1)
    whiten_rewards: bool = _opt(False, "normalize the per-token rewards (scale only)")
    kl_coef: float = _opt(0.05, "weight of the per-token KL penalty against the reference", minimum=0)
    cliprange: float = _opt(0.2, "clip range of the policy ratio", above=0)
    vf_coef: float = _opt(0.1, "weight of the value loss", minimum=0)
    cliprange_value: float = _opt(0.2, "clip range of the value predictions", above=0)
    gamma: float = _opt(1.0, "discount factor", minimum=0, maximum=1)
    lam: float = _opt(0.95, "GAE lambda", minimum=0, maximum=1)

    def validate(self) -> None:
        super().validate()
        if not self.reward_model:
            raise ConfigError("--reward-model is required (train one with `halos align --loss rm`)")
        for name in PPO_MODEL_OPTIONS:
            if getattr(self, name):
                resolve_model(getattr(self, name), flag(name))
        if not (Path(self.reward_model) / VALUE_HEAD_FILE).is_file():
            raise ConfigError(f"--reward-model {self.reward_model!r} has no {VALUE_HEAD_FILE}; "
                              f"train a reward model with `halos align --loss rm`")


# ------------------------------------------------------------------- typed values of the options

_INVALID = object()


@functools.cache
def _declared_types(config: type[TrainConfig]) -> dict[str, type]:
    return typing.get_type_hints(config)


def checked_option(config: type[TrainConfig], name: str, value: Any, label: str | None = None
                   ) -> Any:
    """`value` as option `name`'s declared type, in its declared range: an integer may be
    written 2.0 or 1e3, a number as an integer; booleans are only true/false; nothing else is
    converted. Otherwise a ConfigError "<label> must be an integer >= 0, got -1" (label:
    --name by default)."""
    meta = next(f.metadata for f in dataclasses.fields(config) if f.name == name)
    kind = _declared_types(config)[name]
    if kind is list:  # of numbers (adam_betas), each in the declared range
        ok = isinstance(value, list) and meta.get("length", len(value)) == len(value)
        converted = [_typed(float, v, meta) for v in value] if ok else [_INVALID]
        converted = _INVALID if any(v is _INVALID for v in converted) else converted
    else:
        converted = _typed(kind, value, meta)
    if converted is _INVALID:
        raise ConfigError(f"{label or flag(name)} must be {_wanted(kind, meta)}, got {value!r}")
    return converted


def _typed(kind: type, value: Any, meta: typing.Mapping[str, Any]) -> Any:
    """`value` as `kind` within the range in `meta`, or _INVALID."""
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return _INVALID
    if kind is int and isinstance(value, float):
        value = int(value) if value.is_integer() else _INVALID
    elif kind is float:
        value = float(value)
    elif kind in (bool, str, dict) and not isinstance(value, kind):
        return _INVALID
    if value is _INVALID or ("choices" in meta and value not in meta["choices"]):
        return _INVALID
    checks = {"minimum": lambda v, b: v >= b, "above": lambda v, b: v > b,
              "maximum": lambda v, b: v <= b, "below": lambda v, b: v < b}
    ok = all(check(value, meta[key]) for key, check in checks.items() if key in meta)
    return value if ok else _INVALID


def _wanted(kind: type, meta: typing.Mapping[str, Any]) -> str:
    """What option values must be, in words: 'an integer >= 1', 'a number in [0, 1]'."""
    if "choices" in meta:
        return f"one of {meta['choices']}"
    if kind is list:
        return f"a list of {meta.get('length', 'any')} numbers{_range_words(meta)}"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping"}
    return words[kind] + (_range_words(meta) if kind in (int, float) else "")


def _range_words(meta: typing.Mapping[str, Any]) -> str:
    """' >= 0', ' > 0', ' in [0, 1)'... for the range keys of an option's metadata."""
    low = next(((sign, meta[key]) for key, sign in (("minimum", "["), ("above", "(")) if key in meta),
               None)
    high = next(((sign, meta[key]) for key, sign in (("maximum", "]"), ("below", ")"))
                 if key in meta), None)
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def checked_options(values: dict[str, Any], config: type[TrainConfig] = TrainConfig,
                    label: str = "") -> dict[str, Any]:
    """Each of `values` (known option names) checked by `checked_option`; errors read
    "<label><name> must be ..."."""
    return {name: checked_option(config, name, value, f"{label}{name}")
            for name, value in values.items()}


# ------------------------------------------------------------------------ where a model comes from

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# Any of these makes a folder's tokenizer loadable (fast, sentencepiece, BPE or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_model_folder(path: Path) -> bool:
    """A save_pretrained folder: config.json, or a LoRA adapter (halos/train/lora.py) that loads
    as its base model + the adapter."""
    return (path / CONFIG_FILE).is_file() or (path / ADAPTER_CONFIG_FILE).is_file()


def resolve_model(name: str, option: str = "--model") -> str:
    """Decide, before anything loads, whether `name` is a local model folder or a Hub id, and
    say what is missing: an existing path must be a folder with config.json and tokenizer files;
    a path that does not exist is an error; a Hub id (owner/name) is left to the Hub, except
    that offline it must be in the local cache. Returns `name`."""
    path = Path(name).expanduser()
    if path.is_file():
        raise ConfigError(f"{option} {name!r} is a file; give the model's folder (config.json, "
                          f"weights, tokenizer) or a Hub id owner/name")
    if path.is_dir():
        if not is_model_folder(path):
            raise ConfigError(f"{option} {name!r} has no {CONFIG_FILE}: not a saved model folder "
                              f"(save_pretrained writes one)")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"{option} {name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}"
                              f"); save the tokenizer into it too (tokenizer.save_pretrained)")
        return name
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or ".." in name or "--" in name:
        raise ConfigError(f"{option} {name!r}: no such folder")
    if not HUB_ID.fullmatch(name):
        raise ConfigError(f"{option} {name!r}: no such folder (a Hub model id has the form "
                          f"owner/name)")
    offline = next((v for v in OFFLINE_VARIABLES
                    if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")), None)
    if offline and not _in_hub_cache(name):
        raise ConfigError(f"{option} {name!r}: no such folder, and as a Hub id it is not in the "
                          f"Hugging Face cache while {offline} is set; download it first "
                          f"(hf download {name}) or give a local folder")
    return name


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, CONFIG_FILE), str)


def ppo_hyperparameters() -> dict[str, Any]:
    """The options PPO adds to the training options (a losses-table row's `params`), with their
    defaults; the models are columns of their own."""
    base = set(_FIELDS) | set(PPO_MODEL_OPTIONS)
    return {f.name: f.default for f in dataclasses.fields(PPOConfig) if f.name not in base}


def load_yaml_config(path: str | Path, config: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """Read a YAML run config; an unknown key, a duplicate key or a value of the wrong type or
    range is an error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file")
    try:
        values = read_yaml(path) or {}
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - fields, key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; valid options are {sorted(fields)}")
    return checked_options(values, config, f"{path}: ")


def resolve_deepspeed_config(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    named = DEEPSPEED_CONFIG_DIR / f"{name_or_path}.json"
    if named.is_file():
        return named
    choices = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"--deepspeed {name_or_path!r}: not a JSON file nor one of {choices}")
