"""Each job's inputs and exact `halos` arguments, from the rows of its model, dataset and loss.

The rules (rules/*.smk) only pick these: `params: args=run_args(hs.align_args)` etc. Every
function takes the suite and the job's wildcards; every path comes from `suite.layout`
(halos/suite/paths.py).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from halos.config import PPO_UNUSED_OPTIONS
from halos.suite.paths import SFT, base_model_dir, data_dir
from halos.suite.resources import world_size
from halos.suite.tables import Run, Suite, SuiteError

# ------------------------------------------------------------------------------ models and inputs


def base_model(suite: Suite, model: str) -> str:
    """Where the base model loads from: models/{model} for built-in tiny and imported GGUF
    models, else the source."""
    return base_model_dir(model) if suite.builds_base_model(model) else suite.models[model]["source"]


def start_model(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """The checkpoint a loss row starts from (and, for reference losses, its reference)."""
    if suite.losses[loss]["from_sft"]:
        return suite.layout.model(model, dataset, SFT)
    return base_model(suite, model)


def reference_file(suite: Suite, model: str, dataset: str, loss: str) -> str | None:
    """Reference log-probs of the starting checkpoint: SFT's (shared) or the base model's."""
    if not suite.needs_reference(loss):
        return None
    return suite.layout.reference(model, dataset, base=not suite.losses[loss]["from_sft"])


def local_model_inputs(suite: Suite, model: str) -> list[str]:
    """A built-in or imported base model is a folder the DAG builds; a Hub id is not an input."""
    return [base_model(suite, model)] if suite.builds_base_model(model) else []


def train_inputs(suite: Suite, model: str, dataset: str, loss: str) -> dict[str, str]:
    """Inputs of a training job (sft, align) for `unpack()`."""
    inputs = {"data": data_dir(dataset)}
    if suite.losses[loss]["from_sft"] or suite.builds_base_model(model):
        inputs["model"] = start_model(suite, model, dataset, loss)
    ref = reference_file(suite, model, dataset, loss)
    if ref:
        inputs["ref"] = ref
    return inputs


def reward_model_dir(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """The trained reward model an online PPO row scores its rollouts with."""
    return suite.layout.model(model, dataset, suite.losses[loss]["reward_model"])


def ppo_inputs(suite: Suite, model: str, dataset: str, loss: str) -> dict[str, str]:
    """Inputs of an online PPO job: data, start model, reward model (no reference file)."""
    inputs = train_inputs(suite, model, dataset, loss)
    inputs.pop("ref", None)
    inputs["reward_model"] = reward_model_dir(suite, model, dataset, loss)
    return inputs


# ------------------------------------------------------------------------------ options


def cli_args(options: dict[str, Any]) -> str:
    """`{"learning_rate": 5e-5, "progress": False}` -> `--learning-rate 5e-05 --no-progress`."""
    parts: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts += [flag, *(shlex.quote(str(v)) for v in value)]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def data_options(suite: Suite, model: str, dataset: str) -> dict[str, Any]:
    """Options deciding the scored sequences: shared by ref-logps and every job reading it."""
    row, mrow = suite.datasets[dataset], suite.models[model]
    options = {"max_length": row["max_length"], "max_prompt_length": row["max_prompt_length"],
               "max_examples": row["train_examples"], "eval_examples": row["eval_examples"],
               "on_error": row["on_error"], "seed": row["seed"]}
    if mrow.get("chat_template"):
        options["chat_template"] = mrow["chat_template"]
    return options


def system_options(suite: Suite, model: str) -> dict[str, Any]:
    row = suite.models[model]
    return {"deepspeed": row["deepspeed"], "precision": row["precision"],
            "attn_implementation": row["attn_implementation"], "packing": row["packing"],
            "progress": False}


def batch_options(suite: Suite, model: str, loss: str) -> dict[str, int]:
    """Micro-batch size from the models table; accumulation so that the loss row's global
    batch size holds at any GPU count (or the model's default accumulation without one)."""
    mrow, lrow = suite.models[model], suite.losses[loss]
    micro, world = mrow["micro_batch_size"], world_size(suite, model)
    if "batch_size" not in lrow:
        return {"micro_batch_size": micro,
                "gradient_accumulation_steps": mrow["gradient_accumulation_steps"]}
    batch = lrow["batch_size"]
    micro = min(micro, max(1, batch // world))
    if batch % (micro * world):
        raise SuiteError(f"losses table row {loss!r}: batch_size {batch} is not a multiple of "
                         f"micro_batch_size {micro} × {world} processes of model {model!r}; "
                         f"change batch_size or the model's micro_batch_size/gpus")
    return {"micro_batch_size": micro, "gradient_accumulation_steps": batch // (micro * world)}


# The `lora` column's keys (models and losses tables) and the `halos` options they set.
LORA_OPTIONS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                "target_modules": "lora_target_modules", "value_model": "lora_value_model"}


def lora_options(suite: Suite, model: str, loss: str) -> dict[str, Any]:
    """The `lora_*` options of a training job: the losses row's `lora`, then the models row's
    (its keys win); value_model only for online PPO, whose value model it concerns."""
    lora = {**suite.losses[loss].get("lora", {}), **suite.models[model].get("lora", {})}
    if not suite.is_online(loss):
        lora.pop("value_model", None)
    if isinstance(lora.get("target_modules"), list):
        lora["target_modules"] = ",".join(lora["target_modules"])
    return {LORA_OPTIONS[key]: value for key, value in lora.items()}


def train_options(suite: Suite, model: str, dataset: str, loss: str) -> dict[str, Any]:
    """Every option of a training job, in the order: data, system, batch, loss row, LoRA."""
    lrow = suite.losses[loss]
    options = {**data_options(suite, model, dataset), **system_options(suite, model),
               **batch_options(suite, model, loss)}
    options.update(learning_rate=lrow["learning_rate"], epochs=lrow["epochs"],
                   max_steps=lrow["max_steps"])
    options.update(suite.models[model]["train"])
    options.update(lrow["train"])
    options.update(lora_options(suite, model, loss))
    return options


# ------------------------------------------------------------------------------ training jobs


def sft_args(suite: Suite, model: str, dataset: str) -> str:
    options = {"model": base_model(suite, model), "data": data_dir(dataset),
               "out": suite.layout.sft(model, dataset), **train_options(suite, model, dataset, SFT)}
    return cli_args(options)


def align_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """`halos align` arguments of a loss row (also reward models: class rm)."""
    lrow = suite.losses[loss]
    options = {"loss": lrow["class"], "model": start_model(suite, model, dataset, loss),
               "data": data_dir(dataset), "out": suite.layout.run(model, dataset, loss),
               "ref_logps": reference_file(suite, model, dataset, loss),
               **train_options(suite, model, dataset, loss), **lrow["params"]}
    return cli_args(options)


def ppo_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """`halos ppo` arguments of an online PPO row: the policy starts from (and is regularized
    towards) the row's start model; its hyperparameters are the row's params."""
    options = {"model": start_model(suite, model, dataset, loss),
               "reward_model": reward_model_dir(suite, model, dataset, loss),
               "data": data_dir(dataset), "out": suite.layout.run(model, dataset, loss),
               **train_options(suite, model, dataset, loss), **suite.losses[loss]["params"]}
    return cli_args({k: v for k, v in options.items() if k not in PPO_UNUSED_OPTIONS})


def ref_args(suite: Suite, model: str, dataset: str, base: bool) -> str:
    """`halos ref-logps`: of the SFT model (ref_logps.pt) or of the base model (ref_logps_base.pt)."""
    model_path = base_model(suite, model) if base else suite.layout.model(model, dataset, SFT)
    options = {"model": model_path, "data": data_dir(dataset),
               "out": suite.layout.reference(model, dataset, base),
               **data_options(suite, model, dataset), **system_options(suite, model),
               "micro_batch_size": suite.models[model]["micro_batch_size"]}
    return cli_args(options)


# ------------------------------------------------------------------------------ data and base models


def prepare_args(suite: Suite, dataset: str) -> str:
    row = suite.datasets[dataset]
    parts = [cli_args({"loader": row["loader"], "source": row["source"], "out": data_dir(dataset),
                       "seed": row["seed"], "on_error": row["on_error"]})]
    for flag, mapping in (("--split", row.get("splits", {})), ("--max-examples", row.get("sizes", {})),
                          ("--option", row.get("options", {}))):
        parts += [f"{flag} {shlex.quote(f'{k}={v}')}" for k, v in mapping.items()]
    return " ".join(parts)


def mix_parts(suite: Suite, dataset: str) -> list[str]:
    return [data_dir(part) for part in suite.datasets[dataset]["mix"]]


def mix_args(suite: Suite, dataset: str) -> str:
    """`halos data mix PART... --out data/{dataset}`."""
    parts = " ".join(shlex.quote(p) for p in mix_parts(suite, dataset))
    return f"{parts} {cli_args({'out': data_dir(dataset)})}"


def tiny_model_args(suite: Suite, model: str) -> str:
    row = suite.models[model]
    options = {"size": row["tiny_size"], "corpus": data_dir(row["tiny_corpus"]),
               "out": base_model_dir(model), "vocab_size": row.get("tiny_vocab_size"), "seed": 0}
    return cli_args(options)


def import_model_args(suite: Suite, model: str) -> str:
    """`halos import-model`: a GGUF row's file into models/{model}."""
    row = suite.models[model]
    return cli_args({"source": row["source"], "gguf_file": row["gguf_file"],
                     "out": base_model_dir(model)})


# ------------------------------------------------------------------------------ evaluation


def eval_files(suite: Suite, run: Run) -> list[str]:
    """The eval outputs of one run, as the suite's `eval:` section asks."""
    ev, where = suite.eval, (run.model, run.dataset, run.loss)
    files = [suite.layout.eval_file("preference.json", *where)] if ev["preference"] else []
    if suite.is_reward_model(run.loss):
        return files  # a reward model is scored on preference pairs only; it does not generate
    if ev.get("judge") and run.loss != SFT:
        # The SFT model's samples are the baseline of every judge file (its own score is the
        # judges' baseline_score); judging it against itself says nothing.
        files.append(suite.layout.eval_file("judge.json", *where))
    if ev.get("lm_eval"):
        files.append(suite.layout.eval_file("lm_eval.json", *where))
    return files


def sample_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    sample, where = suite.eval["sample"], (model, dataset, loss)
    return cli_args({"model": suite.layout.model(*where),
                     "prompts": f"{data_dir(dataset)}/{suite.datasets[dataset]['prompts']}",
                     "out": suite.layout.eval_file("samples.jsonl", *where),
                     "temperature": sample["temperature"], "seed": sample["seed"],
                     "n": sample["n"], "max_new_tokens": sample["max_new_tokens"]})


def preference_ref(suite: Suite, model: str, dataset: str, loss: str) -> str | None:
    """The implicit reward of a reference-based loss is measured against its own reference."""
    return None if suite.is_reward_model(loss) else reference_file(suite, model, dataset, loss)


def preference_inputs(suite: Suite, model: str, dataset: str, loss: str) -> dict[str, Any]:
    return {"model": suite.layout.model(model, dataset, loss), "data": data_dir(dataset),
            "ref": preference_ref(suite, model, dataset, loss) or []}


def preference_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    where = (model, dataset, loss)
    return cli_args({"model": suite.layout.model(*where), "data": data_dir(dataset),
                     "ref_logps": preference_ref(suite, *where),
                     "examples": suite.eval["preference_examples"],
                     "out": suite.layout.eval_file("preference.json", *where)})


def judge_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    where = (model, dataset, loss)
    return cli_args({"samples": suite.layout.eval_file("samples.jsonl", *where),
                     "baseline": suite.layout.eval_file("samples.jsonl", model, dataset, SFT),
                     "out": suite.layout.eval_file("judge.json", *where),
                     "judge": suite.eval["judge"]})


def lm_eval_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    spec, where = suite.eval["lm_eval"], (model, dataset, loss)
    # A task YAML is named relative to the suite file, like the tables; a hub task by its name.
    tasks = ",".join(str((suite.path.parent / t).resolve()) if t.endswith((".yaml", ".yml")) else t
                     for t in spec["tasks"])
    return cli_args({"model": suite.layout.model(*where), "tasks": tasks,
                     "apply_chat_template": spec["apply_chat_template"],
                     "limit": spec.get("limit"),
                     "out": suite.layout.eval_file("lm_eval.json", *where)})


def evaluated_losses(suite: Suite, reward_models: bool) -> list[str]:
    """The loss rows whose evals are one `evaluate` job (the generating policies) or, with
    `reward_models`, one `eval_preference` job each (a reward model only scores pairs)."""
    return [loss for loss in suite.losses if suite.is_reward_model(loss) == reward_models]


def evaluate_outputs(suite: Suite) -> list[str]:
    """The `evaluate` rule's outputs (paths with the run's wildcards)."""
    return [suite.layout.eval_file(name) for name in evaluate_files(suite)]


def evaluate_files(suite: Suite) -> list[str]:
    """What the `evaluate` job of a generating run writes under eval/: the model-based evals the
    suite's `eval:` section asks for (samples.jsonl feeds the judge rule)."""
    ev = suite.eval
    wanted = (("preference.json", ev["preference"]), ("samples.jsonl", ev.get("judge")),
              ("lm_eval.json", ev.get("lm_eval")))
    return [name for name, asked in wanted if asked]


def evaluate_inputs(suite: Suite, model: str, dataset: str, loss: str) -> dict[str, Any]:
    inputs = preference_inputs(suite, model, dataset, loss)
    if not suite.eval["preference"]:
        inputs["ref"] = []
    return inputs


EVALUATE_COMMANDS = {"preference.json": ("eval preference", preference_args),
                     "samples.jsonl": ("sample", sample_args),
                     "lm_eval.json": ("eval lm-eval", lm_eval_args)}  # evaluate_files' names


def evaluate_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """One process for all of a run's model-based evals (`halos A --then B`): the model's imports
    and start-up are paid once instead of once per eval."""
    steps = (EVALUATE_COMMANDS[name] for name in evaluate_files(suite))
    return " --then ".join(f"{command} {args(suite, model, dataset, loss)}" for command, args in steps)


def eval_job(suite: Suite, loss: str) -> tuple[str, list[str]]:
    """(rule, files under eval/) of a run's model-based eval job: `evaluate` for a generating
    policy, `eval_preference` (its pairs only, when the suite asks) for a reward model."""
    if suite.is_reward_model(loss):
        return "eval_preference", ["preference.json"] if suite.eval["preference"] else []
    return "evaluate", evaluate_files(suite)


# ------------------------------------------------------------------------------ publish, report


def publish_files(suite: Suite) -> list[str]:
    if not suite.publish["enabled"]:
        return []
    return [suite.layout.published(run.model, run.dataset, run.loss) for run in suite.runs]


def publish_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """Options of `halos publish` for one run (the template stays out of Snakemake's formatting)."""
    publish = suite.publish
    source = None if suite.is_imported(model) else suite.models[model].get("source")
    base = source if source and not Path(source).exists() else None
    adapter = publish.get("lora") == "adapter" and lora_options(suite, model, loss).get("lora_r")
    if adapter and suite.losses[loss]["from_sft"]:  # the adapter's base: the published SFT run
        from halos.hub.plan import repo_id_from_template

        base = repo_id_from_template(publish["repo_template"], org=publish.get("org"),
                                     suite=suite.name, model=model, dataset=dataset, loss=SFT)
    args = cli_args({"repo_template": publish["repo_template"], "org": publish.get("org"),
                     "suite": suite.name, "run": f"{model}/{dataset}/{loss}",
                     "eval_dir": suite.layout.eval_dir(model, dataset, loss),
                     "private": publish["private"],
                     "collection": publish.get("collection"), "revision": publish.get("revision"),
                     "base_model": base, "adapter": True if adapter else None})
    return args + (" --overwrite" if publish["overwrite"] else "")


def report_inputs(suite: Suite) -> list[str]:
    return [f for run in suite.runs for f in eval_files(suite, run)]


def report_args(suite: Suite) -> str:
    """`halos report` reads exactly this suite's runs, never a glob over results/."""
    runs = " ".join(shlex.quote(suite.run_dir(run)) for run in suite.runs)
    return f"--runs {runs} " + cli_args({"out": suite.layout.leaderboard("md"),
                                         "plots": suite.layout.plots})


def final_outputs(suite: Suite) -> list[str]:
    """What `rule all` asks for: the leaderboard (which needs every eval) and opt-in uploads."""
    return [suite.layout.leaderboard("md"), suite.layout.leaderboard("csv"), *publish_files(suite)]
