"""A suite: three config tables (models, losses, datasets) and a suite file that picks their rows.

    suite file (configs/suites/NAME.yaml)
      tables: {models: ../models.yaml, losses: ../losses/NAME.yaml, datasets: ../datasets.yaml}
      models: [..]   datasets: [..]   losses: [..] or all   exclude: [{model: .., loss: ..}]
      pending: [..]  eval: {...}      publish: {...}

Every table row and the suite file are validated against the JSON schemas in configs/schemas/
(unknown keys are errors; the schemas' defaults are filled in, so code reads columns directly),
then cross-checked here: a loss class must be registered (`halos losses`), loss hyperparameters
must exist on the class, a loader must be registered (`halos.data.loaders.LOADERS`), names must
exist in the tables. Errors name the file, the table and the row.

A row of class `online_ppo` is no registered loss but online PPO (`halos ppo`, rule `ppo`): its
`reward_model` column names the `rm` row whose model it trains against, and its `params` are
PPO hyperparameters. Its model is evaluated like every other policy.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halos.config import ONLINE_PPO, ConfigError, PPOConfig, TrainConfig, checked_options
from halos.data.errors import DataError
from halos.data.loaders import LOADERS, checked_loader_options
from halos.files import read_yaml
from halos.suite.paths import SFT, Layout

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "configs" / "schemas"
DEFAULT_SUITE = REPO_ROOT / "configs" / "suites" / "tiny.yaml"
DATASETS_TABLE = REPO_ROOT / "configs" / "datasets.yaml"
TABLES = ("models", "losses", "datasets")
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
               "deepspeed", "precision", "learning_rate", "epochs", "max_steps", "lora_r",
               "lora_alpha", "lora_dropout", "lora_target_modules", "lora_value_model")


class SuiteError(ValueError):
    """A bad table row or suite file; the message names the file, the table and the row."""


@dataclass(frozen=True, order=True)
class Run:
    """One leaderboard row: a loss row applied to a model on a dataset."""

    model: str
    dataset: str
    loss: str


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

    @property
    def layout(self) -> Layout:
        """Where this suite's artifacts live (halos/suite/paths.py)."""
        return Layout(self.name)

    def run_dir(self, run: Run) -> str:
        return self.layout.run(run.model, run.dataset, run.loss)

    # --- what a row is
    def is_builtin(self, model: str) -> bool:
        return "tiny_size" in self.models[model]

    def is_imported(self, model: str) -> bool:
        """A GGUF row: converted once into models/{name} (rule import_model)."""
        return "gguf_file" in self.models[model]

    def builds_base_model(self, model: str) -> bool:
        """Whether the DAG writes the row's base model to models/{name} (tiny or imported)."""
        return self.is_builtin(model) or self.is_imported(model)

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
        """Loss rows trained by `halos align` (rule `align`): policies and reward models, not
        the SFT stage, not online PPO."""
        return [n for n in self.losses if n != SFT and n not in self.pending
                and not self.is_online(n)]

    def online_losses(self) -> list[str]:
        """Online PPO rows (the `ppo` rule)."""
        return [n for n in self.losses if n not in self.pending and self.is_online(n)]


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
    path = Path(path or DEFAULT_SUITE)
    spec = _read_yaml(path, "suite file")
    if isinstance(spec, dict) and isinstance(spec.get("eval"), dict):
        # `judge: null` / `lm_eval: null` mean "off", exactly like leaving the key out.
        spec["eval"] = {k: v for k, v in spec["eval"].items() if v is not None}
    spec = _validated(spec, "suite", f"suite file {path}")
    name = spec.get("name", path.stem)
    if not re.fullmatch(_schema("suite")["x-name-pattern"], name):
        raise SuiteError(f"suite file {path}: name {name!r} must match "
                         f"{_schema('suite')['x-name-pattern']} (it becomes results/{{name}}/)")
    tables = {kind: (path.parent / spec["tables"][kind]).resolve() for kind in TABLES}
    models, losses, datasets = (load_table(tables[kind], kind) for kind in TABLES)
    pending = _pending_rows(spec["pending"], losses, path, tables["losses"])
    _check_losses(losses, tables["losses"], set(pending))
    _check_datasets(datasets, tables["datasets"])
    _check_models(models, tables["models"], datasets)
    _check_publish(spec["publish"], name, path)
    suite = Suite(name=name, path=path, tables=tables, models=models, losses=losses,
                  datasets=datasets, runs=[], pending=pending, eval=spec["eval"],
                  publish=spec["publish"])
    suite.runs = expand_runs(spec, suite)
    return suite


def _pending_rows(names: list[str], losses: dict[str, dict], path: Path,
                  table: Path) -> dict[str, str]:
    """Rows listed under `pending:` whose class is not registered yet: {row: why}."""
    registered = loss_registry()
    pending = {}
    for name in names:
        if name not in losses:
            raise SuiteError(f"suite file {path}: pending loss {name!r} is not a row of the "
                             f"losses table {table}")
        if losses[name]["class"] not in registered:
            pending[name] = (f"class {losses[name]['class']!r} is not registered yet "
                             f"(`halos losses`); planned once it is")
    return pending


def load_table(path: str | Path, kind: str) -> dict[str, dict]:
    """A table file is a YAML mapping `row name: {column: value}`; each row is schema-checked."""
    path = Path(path)
    rows = _read_yaml(path, f"{kind} table")
    if not isinstance(rows, dict) or not rows:
        raise SuiteError(f"{kind} table {path}: expected a non-empty mapping of row name -> row")
    pattern = _schema(kind)["x-name-pattern"]
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
    excludes = spec["exclude"]
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
    """A table, suite or schema file; errors read "<what> <path>:<line>: duplicate key 'x'"."""
    if not path.is_file():
        raise SuiteError(f"{what} {path}: no such file")
    try:
        return read_yaml(path)
    except ValueError as err:
        raise SuiteError(f"{what} {err}") from err


def _schema_path(kind: str) -> Path:
    return SCHEMA_DIR / f"{kind}.schema.yaml"


def _schema(kind: str) -> dict:
    return _read_schema(_schema_path(kind))


@functools.cache
def _read_schema(path: Path) -> dict:
    return _read_yaml(path, "schema")


def _validated(data: Any, kind: str, where: str) -> dict:
    """snakemake's `validate` (fills schema defaults), with the table and row in the message."""
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    if not isinstance(data, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(data).__name__}")
    _schema(kind)  # snakemake reads the file itself: first make sure it has no duplicate key
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
        unknown = sorted(set(row["params"]) - set(known))
        if unknown:
            valid = ", ".join(f"{k}={v}" for k, v in known.items()) or "none"
            raise SuiteError(f"{where}: class {cls!r} has no hyperparameter(s) {unknown}; "
                             f"valid: {valid}")
        if cls == ONLINE_PPO_CLASS:
            _typed_options(row["params"], PPOConfig, f"{where}: params: ")
        if (cls == SFT) != (name == SFT):
            raise SuiteError(f"{where}: the SFT stage is the row named {SFT!r} with class {SFT!r}; "
                             f"class {cls!r} cannot be row {name!r}")
        if cls == SFT and row["from_sft"]:
            raise SuiteError(f"{where}: the SFT stage starts from the base model (from_sft: false)")
        _check_train_options(row["train"], where)
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
        elif row["loader"] not in LOADERS:
            raise SuiteError(f"{where}: loader {row['loader']!r} is not registered; choose from "
                             f"{sorted(LOADERS)} (halos/data/loaders.py)")
        else:
            try:
                checked_loader_options(row["loader"], row.get("options", {}))
            except DataError as err:
                raise SuiteError(f"{where}: {err}") from err
        if row["max_prompt_length"] >= row["max_length"]:
            raise SuiteError(f"{where}: max_prompt_length ({row['max_prompt_length']}) must be "
                             f"smaller than max_length ({row['max_length']})")


def _check_models(models: dict[str, dict], path: Path, datasets: dict[str, dict]) -> None:
    for name, row in models.items():
        where = f"models table {path}, row {name!r}"
        if ("source" in row) == ("tiny_size" in row):
            raise SuiteError(f"{where}: set exactly one of `source` (Hugging Face id or local path) "
                             f"and `tiny_size` (a built-in tiny model)")
        if row.get("source", "").startswith("package:") and "gguf_file" not in row:
            raise SuiteError(f"{where}: source {row['source']!r} is a Python package; name the "
                             f"GGUF file inside it with `gguf_file`")
        if "tiny_size" in row and row["tiny_corpus"] not in datasets:
            raise SuiteError(f"{where}: tiny_corpus {row['tiny_corpus']!r} is not a row of the "
                             f"datasets table")
        _check_train_options(row["train"], where)


def _typed_options(options: dict, config: type[TrainConfig], label: str) -> None:
    """Each value of the declared type and range of its `halos` option (halos/config.py)."""
    try:
        checked_options(options, config, label)
    except ConfigError as err:
        raise SuiteError(str(err)) from err


def _check_train_options(options: dict, where: str) -> None:
    import dataclasses

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
    _typed_options(options, TrainConfig, f"{where}: train option ")


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
