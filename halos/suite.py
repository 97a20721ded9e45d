"""A suite: three config tables (models, losses, datasets) and a suite file that picks their rows.

`rules/common.smk` calls `load_suite` once; everything the Snakemake rules need (the runs of the
cross product, each job's exact `halos` arguments, resources and inputs) comes from functions
here, so the rules stay thin and this logic is unit-tested without Snakemake.

    suite file (configs/suites/NAME.yaml)
      tables: {models: ../models.yaml, losses: ../losses/NAME.yaml, datasets: ../datasets.yaml}
      models: [..]   datasets: [..]   losses: [..] or all   exclude: [{model: .., loss: ..}]
      pending: [..]  eval: {...}      publish: {...}

Every table row and the suite file are validated against the JSON schemas in configs/schemas/
(unknown keys are errors), then cross-checked here: a loss class must be registered
(`halos losses`), loss hyperparameters must exist on the class, names must exist in the tables.
Errors name the file, the table and the row.

A row of class `online_ppo` is no registered loss but online PPO (`halos ppo`, rule `ppo`): its
`reward_model` column names the `rm` row whose model it trains against, and its `params` are
PPO hyperparameters. Its model is evaluated like every other policy.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from halos.config import ONLINE_PPO, PPO_UNUSED_OPTIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "configs" / "schemas"
DEFAULT_SUITE = REPO_ROOT / "configs" / "suites" / "tiny.yaml"
TABLES = ("models", "losses", "datasets")
SFT = "sft"  # the loss row (and class) that is the SFT stage: results/{model}/{dataset}/sft/
REWARD_MODEL_CLASS = "rm"
ONLINE_PPO_CLASS = ONLINE_PPO  # online PPO rows (`halos ppo`), not a registered loss
# Options that decide which token sequences a job scores. They must be identical for the
# ref-logps job and every alignment job reading its file, so only the datasets table (and the
# model's chat template) may set them, never a loss row.
DATA_OPTIONS = ("max_length", "max_prompt_length", "max_examples", "eval_examples", "on_error",
                "chat_template", "seed")
# Options the DAG sets itself: a table may not.
DAG_OPTIONS = ("model", "data", "out", "loss", "loss_params", "ref_logps", "reference_model",
               "config", "overwrite", "progress", "micro_batch_size", "gradient_accumulation_steps",
               "deepspeed", "precision", "learning_rate", "epochs", "max_steps")


class SuiteError(ValueError):
    """A bad table row or suite file; the message names the file, the table and the row."""


@dataclass(frozen=True, order=True)
class Run:
    """One leaderboard row: a loss row applied to a model on a dataset."""

    model: str
    dataset: str
    loss: str

    @property
    def dir(self) -> str:
        return f"results/{self.model}/{self.dataset}/{self.loss}"


@dataclass
class Suite:
    name: str
    path: Path
    tables: dict[str, Path]
    models: dict[str, dict]
    losses: dict[str, dict]
    datasets: dict[str, dict]
    runs: list[Run]
    pending: dict[str, str] = field(default_factory=dict)  # loss row -> why it is not planned
    eval: dict = field(default_factory=dict)
    publish: dict = field(default_factory=dict)

    # --- what a row is
    def is_builtin(self, model: str) -> bool:
        return "tiny_size" in self.models[model]

    def loss_class(self, loss: str) -> str:
        return self.losses[loss]["class"]

    def needs_reference(self, loss: str) -> bool:
        """Whether the row's model has a reference: online PPO's is its start model, whose
        reference log-probs its preference eval reads (the PPO job itself never does)."""
        if self.is_online(loss):
            return True
        return loss_registry()[self.loss_class(loss)]["needs_reference"]

    def is_reward_model(self, loss: str) -> bool:
        return self.loss_class(loss) == REWARD_MODEL_CLASS

    def is_online(self, loss: str) -> bool:
        return self.loss_class(loss) == ONLINE_PPO_CLASS

    def align_losses(self) -> list[str]:
        """Loss rows trained by the `align` rule (policies, not the SFT stage, not reward models,
        not online PPO)."""
        return [n for n in self.losses if n != SFT and n not in self.pending
                and not self.is_reward_model(n) and not self.is_online(n)]

    def online_losses(self) -> list[str]:
        """Online PPO rows (the `ppo` rule)."""
        return [n for n in self.losses if n not in self.pending and self.is_online(n)]

    def reward_losses(self) -> list[str]:
        return [n for n in self.losses if n not in self.pending and self.is_reward_model(n)]


# ------------------------------------------------------------------------------------ loading

def loss_registry() -> dict[str, dict]:
    """What the DAG needs from `halos.losses.LOSSES`: {name: {needs_reference, batch_kind,
    model_head, hyperparameters}}. Importing the registry imports torch (seconds), so the answer
    is cached in the temp dir under a hash of the loss modules' source: planning stays fast and
    the cache can never be stale."""
    import hashlib
    import json
    import tempfile

    sources = sorted((REPO_ROOT / "halos" / "losses").glob("*.py"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources))
    cache = Path(tempfile.gettempdir()) / f"halos-losses-{digest.hexdigest()[:16]}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass  # a half-written cache from a concurrent writer: recompute
    from halos.losses import LOSSES

    info = {name: {"needs_reference": cls.needs_reference, "batch_kind": cls.batch_kind,
                   "model_head": cls.model_head,
                   "hyperparameters": {k: repr(p.default) for k, p in cls.hyperparameters().items()}}
            for name, cls in LOSSES.items()}
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, cache)
    return info


def load_suite(path: str | Path | None = None) -> Suite:
    """Read and validate a suite file and its three tables; expand the runs."""
    LOSSES = loss_registry()
    path = Path(path or DEFAULT_SUITE)
    spec = _read_yaml(path, "suite file")
    if isinstance(spec, dict) and isinstance(spec.get("eval"), dict):
        # `judge: null` / `lm_eval: null` mean "off", exactly like leaving the key out.
        spec["eval"] = {k: v for k, v in spec["eval"].items() if v is not None}
    spec = _validated(spec, "suite", f"suite file {path}")
    tables = {kind: (path.parent / spec["tables"][kind]).resolve() for kind in TABLES}
    models, losses, datasets = (load_table(tables[kind], kind) for kind in TABLES)
    pending = {}
    for name in spec.get("pending", []):
        if name not in losses:
            raise SuiteError(f"suite file {path}: pending loss {name!r} is not a row of the "
                             f"losses table {tables['losses']}")
        if losses[name]["class"] not in LOSSES:
            pending[name] = (f"class {losses[name]['class']!r} is not registered yet "
                             f"(`halos losses`); planned once it is")
    _check_losses(losses, tables["losses"], set(pending))
    _check_datasets(datasets, tables["datasets"])
    _check_models(models, tables["models"], datasets)
    _check_publish(spec["publish"], spec.get("name", path.stem), path)
    suite = Suite(name=spec.get("name", path.stem), path=path, tables=tables, models=models,
                  losses=losses, datasets=datasets, runs=[], pending=pending,
                  eval=spec.get("eval", {}), publish=spec.get("publish", {}))
    suite.runs = expand_runs(spec, suite)
    return suite


def load_table(path: str | Path, kind: str) -> dict[str, dict]:
    """A table file is a YAML mapping `row name: {column: value}`; each row is schema-checked."""
    path = Path(path)
    rows = _read_yaml(path, f"{kind} table")
    if not isinstance(rows, dict) or not rows:
        raise SuiteError(f"{kind} table {path}: expected a non-empty mapping of row name -> row")
    pattern = _schema(kind)["x-name-pattern"]
    import re

    # Keys starting with "." are templates for YAML anchors (`<<: *from_sft`), not rows.
    rows = {name: row for name, row in rows.items() if not str(name).startswith(".")}
    for name, row in rows.items():
        where = f"{kind} table {path}, row {name!r}"
        if not isinstance(name, str) or not re.fullmatch(pattern, name):
            raise SuiteError(f"{where}: row names must match {pattern} (they become paths)")
        if not isinstance(row, dict):
            raise SuiteError(f"{where}: expected a mapping of column: value, got {row!r}")
        rows[name] = _validated(row, kind, where)
    return rows


def expand_runs(spec: dict, suite: Suite) -> list[Run]:
    """The cross product of the chosen rows, less exclusions and pending rows, sorted."""
    chosen = {}
    for kind in TABLES:
        table = getattr(suite, kind)
        names = list(table) if spec[kind] == "all" else list(spec[kind])
        for name in names:
            if name not in table:
                raise SuiteError(f"suite file {suite.path}: {kind} {name!r} is not a row of the "
                                 f"{kind} table {suite.tables[kind]}; rows: {sorted(table)}")
        chosen[kind] = [n for n in names if not (kind == "losses" and n in suite.pending)]
    excludes = spec.get("exclude", [])
    for rule in excludes:
        for key, value in rule.items():
            table = getattr(suite, {"model": "models", "dataset": "datasets", "loss": "losses"}[key])
            for name in [value] if isinstance(value, str) else value:
                if name not in table:
                    raise SuiteError(f"suite file {suite.path}: exclude {rule} names {key} "
                                     f"{name!r}, which is not in the {key}s table")
    runs = [Run(m, d, loss) for m in chosen["models"] for d in chosen["datasets"]
            for loss in chosen["losses"]]
    runs = [run for run in runs if not any(_matches(run, rule) for rule in excludes)]
    if not runs:
        raise SuiteError(f"suite file {suite.path}: the cross product minus exclusions is empty")
    return sorted(runs)


def _matches(run: Run, rule: dict) -> bool:
    return all(getattr(run, key) in ([v] if isinstance(v, str) else v) for key, v in rule.items())


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SuiteError(f"{what} {path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"{what} {path}: not valid YAML: {err}") from err


def _schema_path(kind: str) -> Path:
    return SCHEMA_DIR / f"{kind}.schema.yaml"


def _schema(kind: str) -> dict:
    return yaml.safe_load(_schema_path(kind).read_text())


def _validated(data: Any, kind: str, where: str) -> dict:
    """snakemake's `validate` (fills schema defaults), with the table and row in the message."""
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    if not isinstance(data, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(data).__name__}")
    try:
        validate(data, str(_schema_path(kind)))
    except WorkflowError as err:
        # snakemake wraps jsonschema's error (the one naming the field) as the last context.
        detail = err.__cause__ or err.__context__
        if isinstance(detail, jsonschema.ValidationError):
            at = "/".join(str(p) for p in detail.absolute_path) or "(row)"
            raise SuiteError(f"{where}: {at}: {detail.message}") from err
        raise SuiteError(f"{where}: {_short(str(err))}") from err
    return data


def _short(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:600]


def _check_losses(losses: dict[str, dict], path: Path, pending: set[str]) -> None:
    LOSSES = loss_registry()

    for name, row in losses.items():
        where = f"losses table {path}, row {name!r}"
        cls = row["class"]
        if cls == ONLINE_PPO_CLASS:
            _check_online_row(row, where, losses)
        elif "reward_model" in row:
            raise SuiteError(f"{where}: only rows of class {ONLINE_PPO_CLASS!r} take a "
                             f"reward_model column")
        if cls not in LOSSES and cls != ONLINE_PPO_CLASS:
            if name in pending:
                continue
            raise SuiteError(f"{where}: loss class {cls!r} is not registered; choose from "
                             f"{sorted([*LOSSES, ONLINE_PPO_CLASS])} (or list the row under "
                             f"`pending:` in the suite)")
        known = _hyperparameters(cls)
        unknown = sorted(set(row.get("params", {})) - set(known))
        if unknown:
            valid = ", ".join(f"{k}={v}" for k, v in known.items()) or "none"
            raise SuiteError(f"{where}: class {cls!r} has no hyperparameter(s) {unknown}; "
                             f"valid: {valid}")
        if (cls == SFT) != (name == SFT):
            raise SuiteError(f"{where}: the SFT stage is the row named {SFT!r} with class {SFT!r}; "
                             f"class {cls!r} cannot be row {name!r}")
        if cls == SFT and row["from_sft"]:
            raise SuiteError(f"{where}: the SFT stage starts from the base model (from_sft: false)")
        _check_train_options(row.get("train", {}), where)
    if any(row["from_sft"] for row in losses.values()) and SFT not in losses:
        raise SuiteError(f"losses table {path}: rows with from_sft: true need a row named {SFT!r} "
                         f"(class sft) that defines the SFT stage")


def _hyperparameters(cls: str) -> dict[str, str]:
    """{name: repr(default)} of a loss class's hyperparameters, or of online PPO's."""
    if cls == ONLINE_PPO_CLASS:
        from halos.config import ppo_hyperparameters

        return {k: repr(v) for k, v in ppo_hyperparameters().items()}
    return loss_registry()[cls]["hyperparameters"]


def _check_online_row(row: dict, where: str, losses: dict[str, dict]) -> None:
    """An online PPO row names the reward model (an `rm` row of the same table) it trains on."""
    reward = row.get("reward_model")
    if reward is None:
        raise SuiteError(f"{where}: class {ONLINE_PPO_CLASS!r} needs a reward_model column "
                         f"naming a row of class {REWARD_MODEL_CLASS!r}")
    rm_rows = sorted(n for n, r in losses.items() if r["class"] == REWARD_MODEL_CLASS)
    if losses.get(reward, {}).get("class") != REWARD_MODEL_CLASS:
        raise SuiteError(f"{where}: reward_model {reward!r} is not a row of class "
                         f"{REWARD_MODEL_CLASS!r} of this losses table; rows of class "
                         f"{REWARD_MODEL_CLASS!r}: {rm_rows or 'none'}")


def _check_datasets(datasets: dict[str, dict], path: Path) -> None:
    for name, row in datasets.items():
        where = f"datasets table {path}, row {name!r}"
        if "mix" in row:
            extra = sorted({"loader", "source", "splits", "sizes", "options"} & set(row))
            if extra:
                raise SuiteError(f"{where}: a mix row is the concatenation of other rows; "
                                 f"remove {extra} (set them on the parts)")
            for part in row["mix"]:
                if part not in datasets or "mix" in datasets[part]:
                    raise SuiteError(f"{where}: mix part {part!r} is not a loader row of the "
                                     f"datasets table")
        elif not {"loader", "source"} <= set(row):
            raise SuiteError(f"{where}: needs `loader` and `source` (or `mix: [rows]`)")
        if row["max_prompt_length"] >= row["max_length"]:
            raise SuiteError(f"{where}: max_prompt_length ({row['max_prompt_length']}) must be "
                             f"smaller than max_length ({row['max_length']})")


def _check_models(models: dict[str, dict], path: Path, datasets: dict[str, dict]) -> None:
    for name, row in models.items():
        where = f"models table {path}, row {name!r}"
        if ("source" in row) == ("tiny_size" in row):
            raise SuiteError(f"{where}: set exactly one of `source` (Hugging Face id or local path) "
                             f"and `tiny_size` (a built-in tiny model)")
        if "tiny_size" in row and row["tiny_corpus"] not in datasets:
            raise SuiteError(f"{where}: tiny_corpus {row['tiny_corpus']!r} is not a row of the "
                             f"datasets table")
        _check_train_options(row.get("train", {}), where)


def _check_train_options(options: dict, where: str) -> None:
    import dataclasses

    from halos.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in options:
        if key not in fields:
            raise SuiteError(f"{where}: train option {key!r} is not a `halos` option; valid: "
                             f"{sorted(fields - set(DAG_OPTIONS) - set(DATA_OPTIONS))}")
        if key in DATA_OPTIONS:
            raise SuiteError(f"{where}: {key!r} decides which sequences are scored, so the reference "
                             f"log-probs must share it: set it in the datasets table (chat_template: "
                             f"in the models table)")
        if key in DAG_OPTIONS:
            raise SuiteError(f"{where}: {key!r} is set by the DAG or by a table column; "
                             f"use the column instead of train:")


# ------------------------------------------------------------------------------ paths and inputs

def data_dir(dataset: str) -> str:
    return f"data/{dataset}"


def base_model(suite: Suite, model: str) -> str:
    """Where the base model loads from: models/{model} for built-in tiny models, else the source."""
    return f"models/{model}" if suite.is_builtin(model) else suite.models[model]["source"]


def sft_dir(model: str, dataset: str) -> str:
    return f"results/{model}/{dataset}/{SFT}"


def start_model(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """The checkpoint a loss row starts from (and, for reference losses, its reference)."""
    if suite.losses[loss]["from_sft"]:
        return f"{sft_dir(model, dataset)}/model"
    return base_model(suite, model)


def reference_file(suite: Suite, model: str, dataset: str, loss: str) -> str | None:
    """Reference log-probs of the starting checkpoint: SFT's (shared) or the base model's."""
    if not suite.needs_reference(loss):
        return None
    name = "ref_logps.pt" if suite.losses[loss]["from_sft"] else "ref_logps_base.pt"
    return f"results/{model}/{dataset}/{name}"


def local_model_inputs(suite: Suite, model: str) -> list[str]:
    """A built-in base model is a file the DAG builds; a Hub id is not an input."""
    return [base_model(suite, model)] if suite.is_builtin(model) else []


def train_inputs(suite: Suite, model: str, dataset: str, loss: str) -> dict[str, str]:
    """Inputs of a training job (sft, align, reward_model) for `unpack()`."""
    inputs = {"data": data_dir(dataset)}
    start = start_model(suite, model, dataset, loss)
    if suite.losses[loss]["from_sft"] or suite.is_builtin(model):
        inputs["model"] = start
    ref = reference_file(suite, model, dataset, loss)
    if ref:
        inputs["ref"] = ref
    return inputs


def run_model_dir(run: Run) -> str:
    return f"{run.dir}/model"


# ------------------------------------------------------------------------------ job arguments

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
    return {"deepspeed": row["deepspeed"], "precision": row["precision"], "progress": False}


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


def train_options(suite: Suite, model: str, dataset: str, loss: str) -> dict[str, Any]:
    """Every option of a training job, in the order: data, system, batch, loss row."""
    lrow = suite.losses[loss]
    options = {**data_options(suite, model, dataset), **system_options(suite, model),
               **batch_options(suite, model, loss)}
    options.update(learning_rate=lrow["learning_rate"], epochs=lrow["epochs"],
                   max_steps=lrow["max_steps"])
    options.update(suite.models[model].get("train", {}))
    options.update(lrow.get("train", {}))
    return options


def sft_args(suite: Suite, model: str, dataset: str) -> str:
    options = {"model": base_model(suite, model), "data": data_dir(dataset),
               "out": sft_dir(model, dataset), **train_options(suite, model, dataset, SFT)}
    return cli_args(options)


def align_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """`halos align` arguments of a loss row (also reward models: class rm)."""
    lrow = suite.losses[loss]
    options = {"loss": lrow["class"], "model": start_model(suite, model, dataset, loss),
               "data": data_dir(dataset), "out": f"results/{model}/{dataset}/{loss}",
               "ref_logps": reference_file(suite, model, dataset, loss),
               **train_options(suite, model, dataset, loss), **lrow.get("params", {})}
    return cli_args(options)


def reward_model_dir(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """The trained reward model an online PPO row scores its rollouts with."""
    return f"results/{model}/{dataset}/{suite.losses[loss]['reward_model']}/model"


def ppo_inputs(suite: Suite, model: str, dataset: str, loss: str) -> dict[str, str]:
    """Inputs of an online PPO job: data, start model, reward model (no reference file)."""
    inputs = train_inputs(suite, model, dataset, loss)
    inputs.pop("ref", None)
    inputs["reward_model"] = reward_model_dir(suite, model, dataset, loss)
    return inputs


def ppo_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """`halos ppo` arguments of an online PPO row: the policy starts from (and is regularized
    towards) the row's start model; its hyperparameters are the row's params."""
    lrow = suite.losses[loss]
    options = {"model": start_model(suite, model, dataset, loss),
               "reward_model": reward_model_dir(suite, model, dataset, loss),
               "data": data_dir(dataset), "out": f"results/{model}/{dataset}/{loss}",
               **train_options(suite, model, dataset, loss), **lrow.get("params", {})}
    return cli_args({k: v for k, v in options.items() if k not in PPO_UNUSED_OPTIONS})


def ref_args(suite: Suite, model: str, dataset: str, base: bool) -> str:
    """`halos ref-logps`: of the SFT model (ref_logps.pt) or of the base model (ref_logps_base.pt)."""
    model_path = base_model(suite, model) if base else f"{sft_dir(model, dataset)}/model"
    out = f"results/{model}/{dataset}/{'ref_logps_base.pt' if base else 'ref_logps.pt'}"
    options = {"model": model_path, "data": data_dir(dataset), "out": out,
               **data_options(suite, model, dataset), **system_options(suite, model),
               "micro_batch_size": suite.models[model]["micro_batch_size"]}
    return cli_args(options)


def prepare_args(suite: Suite, dataset: str) -> str:
    row = suite.datasets[dataset]
    parts = [cli_args({"loader": row["loader"], "source": row["source"], "out": data_dir(dataset),
                       "seed": row["seed"], "on_error": row["on_error"]})]
    for flag, mapping in (("--split", row.get("splits", {})), ("--max-examples", row.get("sizes", {})),
                          ("--option", row.get("options", {}))):
        parts += [f"{flag} {shlex.quote(f'{k}={v}')}" for k, v in mapping.items()]
    return " ".join(parts)


def mix_parts(suite: Suite, dataset: str) -> list[str]:
    return [data_dir(part) for part in suite.datasets[dataset].get("mix", [])]


MIX_FILES = ("train.jsonl", "test.jsonl", "sft.jsonl", "prompts.jsonl")


def mix_datasets(parts: list[str | Path], out: str | Path) -> dict[str, int]:
    """Concatenate the normalized files of prepared datasets into `out` (atomically). A file
    must be in every part or in none (SFT data from some parts only would bias the mix)."""
    from halos.io import atomic_dir, write_json

    parts = [Path(p) for p in parts]
    counts: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        for name in MIX_FILES:
            have = [p for p in parts if (p / name).is_file()]
            if not have:
                continue
            if len(have) != len(parts):
                missing = [str(p) for p in parts if p not in have]
                raise SuiteError(f"mix {out}: {name} is in {[str(p) for p in have]} but not in "
                                 f"{missing}")
            with open(tmp / name, "w") as handle:
                for part in parts:
                    text = (part / name).read_text()
                    handle.write(text if not text or text.endswith("\n") else text + "\n")
                    counts[name] = counts.get(name, 0) + text.count("\n") + (
                        1 if text and not text.endswith("\n") else 0)
        write_json(tmp / "report.json", {"mix": [str(p) for p in parts], "counts": counts})
    return counts


def tiny_model_args(suite: Suite, model: str) -> str:
    row = suite.models[model]
    options = {"size": row["tiny_size"], "corpus": data_dir(row["tiny_corpus"]),
               "out": f"models/{model}", "vocab_size": row.get("tiny_vocab_size"), "seed": 0}
    return cli_args(options)


# ------------------------------------------------------------------------------ evaluation

def eval_files(suite: Suite, run: Run) -> list[str]:
    """The eval outputs of one run, as the suite's `eval:` section asks."""
    ev, out = suite.eval, f"{run.dir}/eval"
    files = [f"{out}/preference.json"] if ev.get("preference", True) else []
    if suite.is_reward_model(run.loss):
        return files  # a reward model is scored on preference pairs only; it does not generate
    if ev.get("judge") and run.loss != SFT:
        # The SFT model's samples are the baseline of every judge file (its own score is the
        # judges' baseline_score); judging it against itself says nothing.
        files.append(f"{out}/judge.json")
    if ev.get("lm_eval"):
        files.append(f"{out}/lm_eval.json")
    return files


def sample_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    sample = suite.eval.get("sample", {})
    return cli_args({"model": f"results/{model}/{dataset}/{loss}/model",
                     "prompts": f"{data_dir(dataset)}/{suite.datasets[dataset]['prompts']}",
                     "out": f"results/{model}/{dataset}/{loss}/eval/samples.jsonl",
                     "temperature": sample.get("temperature", 0), "seed": sample.get("seed", 0),
                     "n": sample.get("n", 200), "max_new_tokens": sample.get("max_new_tokens", 48)})


def preference_ref(suite: Suite, model: str, dataset: str, loss: str) -> str | None:
    """The implicit reward of a reference-based loss is measured against its own reference."""
    return None if suite.is_reward_model(loss) else reference_file(suite, model, dataset, loss)


def preference_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    ref = preference_ref(suite, model, dataset, loss)
    return cli_args({"model": f"results/{model}/{dataset}/{loss}/model",
                     "data": data_dir(dataset), "ref_logps": ref,
                     "examples": suite.eval.get("preference_examples", 400),
                     "out": f"results/{model}/{dataset}/{loss}/eval/preference.json"})


def judge_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    return cli_args({"samples": f"results/{model}/{dataset}/{loss}/eval/samples.jsonl",
                     "baseline": f"{sft_dir(model, dataset)}/eval/samples.jsonl",
                     "out": f"results/{model}/{dataset}/{loss}/eval/judge.json",
                     "judge": suite.eval["judge"]})


def lm_eval_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    spec = suite.eval["lm_eval"]
    # A task YAML is named relative to the suite file, like the tables; a hub task by its name.
    tasks = ",".join(str((suite.path.parent / t).resolve()) if t.endswith((".yaml", ".yml")) else t
                     for t in spec["tasks"])
    return cli_args({"model": f"results/{model}/{dataset}/{loss}/model", "tasks": tasks,
                     "apply_chat_template": spec.get("apply_chat_template", False),
                     "limit": spec.get("limit"),
                     "out": f"results/{model}/{dataset}/{loss}/eval/lm_eval.json"})


def publish_files(suite: Suite) -> list[str]:
    if not suite.publish.get("enabled"):
        return []
    return [f"{run.dir}/published.json" for run in suite.runs]


def _check_publish(publish: dict, suite_name: str, path: Path) -> None:
    """A bad repo template fails when the suite is planned, not at upload time."""
    if not publish.get("enabled"):
        return
    from halos.hub.plan import PublishError, repo_id_from_template

    try:
        repo_id_from_template(publish["repo_template"], org=publish.get("org"), suite=suite_name,
                              model="m", dataset="d", loss="l")
    except PublishError as err:
        raise SuiteError(f"suite file {path}: publish: {err}") from err


def publish_args(suite: Suite, model: str, dataset: str, loss: str) -> str:
    """Options of `halos publish` for one run (the template stays out of Snakemake's formatting)."""
    publish = suite.publish
    source = suite.models[model].get("source")
    args = cli_args({"repo_template": publish["repo_template"], "org": publish.get("org"),
                     "suite": suite.name, "run": f"{model}/{dataset}/{loss}",
                     "eval_dir": f"results/{model}/{dataset}/{loss}/eval",
                     "private": publish.get("private", True),
                     "collection": publish.get("collection"), "revision": publish.get("revision"),
                     "base_model": source if source and not Path(source).exists() else None})
    return args + (" --overwrite" if publish.get("overwrite") else "")


def final_outputs(suite: Suite) -> list[str]:
    """What `rule all` asks for: the leaderboard (which needs every eval) and opt-in uploads."""
    return ["results/leaderboard.md", "results/leaderboard.csv", *publish_files(suite)]


def report_inputs(suite: Suite) -> list[str]:
    return [f for run in suite.runs for f in eval_files(suite, run)]


# ------------------------------------------------------------------------------ launch, resources

# How a job runs on Slurm (rules/*.smk -> snakemake-executor-plugin-slurm):
#
#   sbatch --nodes N --cpus-per-task C [--gres gpu:G] ...   one allocation per job
#     srun -n1 ... snakemake (the plugin's job step) ->  the rule's shell, on the first node:
#       1 process:     env OMP_NUM_THREADS=C halos ...
#       P per node:    env OMP_NUM_THREADS=C/P torchrun --standalone --nproc_per_node P -m halos ...
#       N nodes:       env OMP_NUM_THREADS=C/P srun --overlap --nodes N --ntasks N --ntasks-per-node 1
#                        torchrun --nnodes N --nproc_per_node P --rdzv_backend c10d
#                        --rdzv_id $SLURM_JOB_ID --rdzv_endpoint FIRST_HOST:PORT -m halos ...
#
# torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for every process; the ranks
# across nodes come from the c10d rendezvous on the first host of the allocation
# (`scontrol show hostnames $SLURM_JOB_NODELIST | head -n1`), whose port is derived from
# $SLURM_JOB_ID so that two jobs sharing a node do not collide. `--standalone` (one node) picks a
# free port by itself. Only commands that join a process group (sft, align, ref-logps) go
# multi-process; sampling and evals run one process with all the job's CPUs.
RDZV_PORT_BASE, RDZV_PORT_SPAN = 29500, 10000


def processes(suite: Suite, model: str) -> int:
    """Training processes per node: the `processes` column, else one per GPU (at least 1)."""
    row = suite.models[model]
    return row.get("processes") or max(1, row["gpus"])


def world_size(suite: Suite, model: str) -> int:
    return processes(suite, model) * suite.models[model]["nodes"]


def add_to_path(directory: str) -> None:
    """Append `directory` to this process's PATH (inherited by its jobs) unless it is there."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if directory not in entries:
        os.environ["PATH"] = os.pathsep.join([*filter(None, entries), directory])


def launch_command(nodes: int, procs: int, threads: int, multinode: bool | None = None) -> str:
    """The shell prefix that runs `halos` as `procs` processes on each of `nodes` nodes.
    `multinode` (default: nodes > 1) picks the srun + c10d path; tests force it on one node."""
    multinode = nodes > 1 if multinode is None else multinode
    if not multinode and nodes == 1 and procs == 1:
        return f"env OMP_NUM_THREADS={threads} halos"
    per_proc = max(1, threads // procs)
    if not multinode:
        return (f"env OMP_NUM_THREADS={per_proc} torchrun --standalone --nproc_per_node {procs} "
                f"-m halos")
    # Nested in the job step that runs this shell (the plugin's `srun -n1`): --overlap shares
    # that step's resources; one torchrun per node spawns the processes of its node.
    return (f"env OMP_NUM_THREADS={per_proc} srun --overlap --nodes {nodes} --ntasks {nodes} "
            f"--ntasks-per-node 1 torchrun --nnodes {nodes} --nproc_per_node {procs} "
            f"--rdzv_backend c10d --rdzv_id $SLURM_JOB_ID --rdzv_endpoint "
            f"$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):"
            f"$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN})) -m halos")


def launcher(suite: Suite, model: str, threads: int, distributed: bool = True) -> str:
    """The one place that decides how a model's job runs `halos`: one process, torchrun on one
    node, or `srun torchrun` over the nodes of a Slurm allocation (see the comment above).
    `distributed=False` (sampling, evals: no process group) always runs one process."""
    if not distributed:
        return launch_command(1, 1, threads)
    row = suite.models[model]
    return launch_command(row["nodes"], processes(suite, model), threads)


def threads(suite: Suite, model: str) -> int:
    """CPU cores per job and node: the `cpus` column, at least one per process."""
    return max(suite.models[model]["cpus"], processes(suite, model))


def resources(suite: Suite, model: str, stage: str) -> dict[str, Any]:
    """Slurm/local resources of a job: `train` (all nodes), `infer` (ref-logps, sampling,
    evals: one node), `cpu` (judge, data, report). One task (launcher) per node: `tasks` becomes
    sbatch --ntasks for CPU jobs; GPU jobs leave it unset (the plugin would read it as
    --ntasks-per-gpu) and get --ntasks-per-node=1 instead."""
    if stage == "cpu":
        return {"mem_mb": 4000, "runtime": 60, "nodes": 1, "gres": "", "cpus_per_task": 1,
                "tasks": 1, "slurm_extra": ""}
    row = suite.models[model]
    train = stage == "train"
    nodes = row["nodes"] if train else 1
    extra = [row.get("slurm_extra", "")]
    if nodes > 1 and row["gpus"]:
        extra.append("--ntasks-per-node=1")
    gpu = f"gpu:{row['gpu_model']}:{row['gpus']}" if row.get("gpu_model") else f"gpu:{row['gpus']}"
    return {"mem_mb": row["mem_mb"], "runtime": row["runtime"] if train else row["eval_runtime"],
            "nodes": nodes, "gres": gpu if row["gpus"] else "",
            "cpus_per_task": threads(suite, model), "tasks": None if row["gpus"] else nodes,
            "slurm_extra": " ".join(e for e in extra if e)}


def wildcard_pattern(names: list[str] | dict) -> str:
    import re

    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "(?!)"
