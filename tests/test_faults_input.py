"""Issue 15, bad input: each fault a user met, reproduced, with the one-line error it now gets.

Items 1 (single-file held-out split), 2 (duplicate YAML keys), 3 (typed run options), 5 (table
rows' train/loader options at suite load), 11 (--model resolution), 12 (prepare and argparse
faults) and 13 (file modes follow the umask).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import yaml

import halos.suite as hs
from halos.cli import main as halos_main
from halos.config import ConfigError, load_yaml_config
from halos.data.cli import main as data_main
from halos.data.errors import DataError
from halos.data.prepare import prepare_dataset, read_rows
from halos.files import atomic_dir, atomic_file

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "tests" / "suites" / "micro.yaml"


def _halos_error(capsys: pytest.CaptureFixture, *argv: str | Path) -> str:
    """Run `halos ARGV` in-process; it must exit 2 with a one-line error, which is returned."""
    assert halos_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _data_error(capsys: pytest.CaptureFixture, *argv: str | Path) -> str:
    assert data_main(["data", *[str(a) for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _paired(prompt: str, good: str, bad: str) -> dict:
    return {"prompt": prompt, "chosen": good, "rejected": bad}


# --- 1. a single-file source: a seeded held-out split by prompt, never a copy of train ----------

def _one_file(tmp_path: Path, n_prompts: int = 30) -> Path:
    rows = [_paired(f"What is {i} plus 1?", f"{i + 1}{suffix}", f"{i + 2}{suffix}")
            for i in range(n_prompts) for suffix in ("", ".")]  # two rows per prompt
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _prompts(path: Path) -> set[str]:
    return {json.dumps(row["prompt"]) for row in read_rows(path)}


def test_single_file_is_split_by_prompt_and_the_split_is_printed(tmp_path, capsys) -> None:
    source = _one_file(tmp_path)
    assert data_main(["data", "prepare", "--loader", "local", "--source", str(source),
                      "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    train, test = _prompts(tmp_path / "o" / "train.jsonl"), _prompts(tmp_path / "o" / "test.jsonl")
    assert len(test) == 3 and len(train) == 27 and not train & test  # 10% of 30 prompts
    assert len(read_rows(tmp_path / "o" / "test.jsonl")) == 6  # both rows of each held-out prompt
    assert "train=54, test=6" in printed
    assert "held out 3 of 30 prompts (10%, seed 0)" in printed and "test.jsonl" in printed
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "held out 3 of 30 prompts" in report["notes"][0]
    # Deterministic for a seed, another seed holds out other prompts.
    prepare_dataset("local", str(source), tmp_path / "again", seed=0)
    assert (tmp_path / "again" / "test.jsonl").read_bytes() == (
        tmp_path / "o" / "test.jsonl").read_bytes()
    prepare_dataset("local", str(source), tmp_path / "seed1", seed=1)
    assert _prompts(tmp_path / "seed1" / "test.jsonl") != test


def test_single_file_with_other_splits_is_refused(tmp_path) -> None:
    source = _one_file(tmp_path, 4)
    with pytest.raises(DataError, match=r"one\.jsonl: one file holds one split.*folder with "
                                        r"train\.jsonl and test\.jsonl"):
        prepare_dataset("local", str(source), tmp_path / "o",
                        splits={"train": "train", "dev": "validation"})
    with pytest.raises(DataError, match=r"only 1 distinct prompt"):
        prepare_dataset("local", str(_one_file(tmp_path, 1)), tmp_path / "o")
    assert not (tmp_path / "o").exists()


# --- 2. duplicate keys in any YAML file this project reads ----------------------------------------

def test_duplicate_key_names_file_line_and_key(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    from halos.files import read_yaml

    path.write_text("a: 1\nb:\n  x: 1\n  x: 2\n")
    with pytest.raises(ValueError, match=rf"^{path}:4: duplicate key 'x' \(first at line 3\)"):
        read_yaml(path)
    # Merge keys (`<<: *anchor`) may be overridden: that is what they are for.
    path.write_text(".base: &base {a: 1, b: 2}\nrow:\n  <<: *base\n  b: 3\n")
    assert read_yaml(path)["row"] == {"a": 1, "b": 3}


@pytest.fixture
def micro_suite(tmp_path: Path):
    """The micro suite with its own copy of the three tables; returns (suite file, folder)."""
    folder = tmp_path / "suite"
    folder.mkdir()
    for name in ("micro-losses.yaml", "micro-datasets.yaml"):
        shutil.copy(MICRO.parent / name, folder / name)
    shutil.copy(REPO / "configs" / "models.yaml", folder / "models.yaml")
    spec = yaml.safe_load(MICRO.read_text())
    spec["tables"]["models"] = "models.yaml"
    (folder / "micro.yaml").write_text(yaml.safe_dump(spec))
    return folder / "micro.yaml", folder


def _suite_error(suite: Path) -> str:
    with pytest.raises(hs.SuiteError) as err:
        hs.load_suite(suite)
    return str(err.value)


def test_duplicate_rows_of_tables_and_keys_of_the_suite_file(micro_suite) -> None:
    suite, folder = micro_suite
    losses = folder / "micro-losses.yaml"
    original = losses.read_text()
    losses.write_text(original + "sft+dpo:\n  class: dpo\n  learning_rate: 1.0\n")
    line = original.count("\n") + 1
    assert _suite_error(suite) == (f"losses table {losses}:{line}: duplicate key 'sft+dpo' "
                                   f"(first at line {original.splitlines().index('sft+dpo:') + 1})")
    losses.write_text(original)
    models = folder / "models.yaml"
    models.write_text(models.read_text() + "tiny-1m: {tiny_size: tiny-1m}\n")
    assert "duplicate key 'tiny-1m'" in _suite_error(suite)
    assert f"models table {models}:" in _suite_error(suite)
    shutil.copy(REPO / "configs" / "models.yaml", models)
    suite.write_text(suite.read_text() + "models: [tiny-3m]\n")
    assert f"suite file {suite}:" in _suite_error(suite) and "duplicate key 'models'" in _suite_error(suite)


def test_duplicate_key_in_a_run_config(tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.1\nseed: 1\nlearning_rate: 0.2\n")
    err = _halos_error(capsys, "sft", "--config", config)
    assert err == f"halos sft: error: {config}:3: duplicate key 'learning_rate' (first at line 1)"


def test_schemas_are_read_with_the_same_loader(monkeypatch, tmp_path) -> None:
    schema = tmp_path / "losses.schema.yaml"
    schema.write_text((REPO / "configs/schemas/losses.schema.yaml").read_text()
                      + "additionalProperties: true\n")
    monkeypatch.setattr(hs.tables, "SCHEMA_DIR", tmp_path)
    with pytest.raises(hs.SuiteError, match=r"losses.schema.yaml:\d+: duplicate key "
                                            r"'additionalProperties'"):
        hs.tables.load_table(REPO / "tests/suites/micro-losses.yaml", "losses")


# --- 3. run options: declared types and ranges, before any work -----------------------------------

@pytest.mark.parametrize(("line", "message"), [
    ('micro_batch_size: "8"', "micro_batch_size must be an integer >= 1, got '8'"),
    ("max_steps: 2.5", "max_steps must be an integer >= 0, got 2.5"),
    ("adam_betas: 0.9", "adam_betas must be a list of 2 numbers in [0, 1), got 0.9"),
    ("adam_betas: [0.9, 1.5]", "adam_betas must be a list of 2 numbers in [0, 1), got [0.9, 1.5]"),
    ('length_bucketing: "no"', "length_bucketing must be true or false, got 'no'"),
    ("length_bucketing: no", "length_bucketing must be true or false, got 'no'"),
    ("learning_rate: -1e-3", "learning_rate must be a number > 0, got -0.001"),
    ("loss_params: 3", "loss_params must be a mapping, got 3"),
    ("lr_schedule: cosin", "lr_schedule must be one of ['cosine', 'linear', 'constant'], got 'cosin'"),
])
def test_yaml_values_are_checked_against_the_declared_type(tmp_path, capsys, line, message) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"model: m\n{line}\n")
    assert _halos_error(capsys, "sft", "--config", config) == f"halos sft: error: {config}: {message}"


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-3\nmax_steps: 1e2\nwarmup_steps: 5\nmax_grad_norm: 2\n")
    values = load_yaml_config(config)
    assert values == {"learning_rate": 0.001, "max_steps": 100, "warmup_steps": 5.0,
                      "max_grad_norm": 2.0}
    assert isinstance(values["max_steps"], int) and isinstance(values["warmup_steps"], float)


@pytest.mark.parametrize(("flag", "message"), [
    ("--max-steps=-1", "--max-steps must be an integer >= 0, got -1"),
    ("--max-examples=-1", "--max-examples must be an integer >= 0, got -1"),
    ("--save-every=-5", "--save-every must be an integer >= 0, got -5"),
    ("--warmup-steps=-0.1", "--warmup-steps must be a number >= 0, got -0.1"),
])
def test_negative_counts_on_the_command_line_are_refused(tmp_path, capsys, flag, message) -> None:
    err = _halos_error(capsys, "sft", "--model", "m", "--data", tmp_path, "--out", tmp_path / "o",
                       flag)
    assert err == f"halos sft: error: {message}"
    assert not (tmp_path / "o").exists()


def test_ppo_options_have_their_ranges(tmp_path) -> None:
    from halos.config import PPOConfig

    cfg = PPOConfig(model="m", data=str(tmp_path), out=str(tmp_path / "o"), reward_model="r",
                    gamma=1.5)
    with pytest.raises(ConfigError, match=r"^--gamma must be a number in \[0, 1\], got 1.5$"):
        cfg.validate()
    cfg = PPOConfig(model="m", data=str(tmp_path), out=str(tmp_path / "o"), reward_model="r",
                    epochs=0)
    with pytest.raises(ConfigError, match=r"^--epochs must be an integer >= 1, got 0$"):
        cfg.validate()


# --- 5. a table row's train: and options: are checked when the suite loads ------------------------

def test_train_option_of_a_wrong_type_names_table_and_row(micro_suite) -> None:
    suite, folder = micro_suite
    losses = folder / "micro-losses.yaml"
    original = losses.read_text()
    losses.write_text(original.replace("train: {save_every: 2}", "train: {save_every: ten}"))
    assert _suite_error(suite) == (f"losses table {losses}, row 'sft+dpo': train option "
                                   f"save_every must be an integer >= 0, got 'ten'")
    losses.write_text(original)
    models = folder / "models.yaml"
    table = yaml.safe_load(models.read_text())
    table["tiny-1m"]["train"] = {"activation_checkpointing": "yes"}
    models.write_text(yaml.safe_dump(table))
    assert _suite_error(suite) == (f"models table {models}, row 'tiny-1m': train option "
                                   f"activation_checkpointing must be true or false, got 'yes'")


def test_ppo_params_of_an_online_row_are_typed(tmp_path) -> None:
    losses = tmp_path / "losses.yaml"
    table = yaml.safe_load((REPO / "configs/losses/tiny.yaml").read_text())
    online = next(name for name, row in table.items() if row["class"] == "online_ppo")
    table[online]["params"]["response_length"] = "long"
    losses.write_text(yaml.safe_dump(table))
    with pytest.raises(hs.SuiteError, match=re.escape(
            f"row '{online}': params: response_length must be an integer >= 1, got 'long'")):
        hs.tables._check_losses(hs.load_table(losses, "losses"), losses, set())


def test_loader_option_typo_is_refused_by_snakemake_n(micro_suite, tmp_path) -> None:
    import subprocess
    import sys

    suite, folder = micro_suite
    datasets = folder / "micro-datasets.yaml"
    datasets.write_text(datasets.read_text().replace("n_train: 640", "n_trian: 640"))
    message = (f"datasets table {datasets}, row 'synthetic': loader 'synthetic' has no option "
               f"'n_trian'; valid options: heldout_fraction, max_operand, n_prompts, n_sft, "
               f"n_test, n_train, sft_mix")
    assert _suite_error(suite) == message
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                             "--directory", str(work), "-n", "--config", f"suite={suite}"],
                            capture_output=True, text=True, timeout=300, cwd=work)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    datasets.write_text(datasets.read_text().replace("n_trian: 640", "n_train: ten"))
    assert "loader 'synthetic' option n_train must be an integer, got 'ten'" in _suite_error(suite)


# --- 11. --model: a local folder or a Hub id, decided before anything loads ----------------------

def _model_error(capsys, tmp_path: Path, model: str | Path) -> str:
    return _halos_error(capsys, "sft", "--model", model, "--data", tmp_path, "--out", tmp_path / "o")


def test_model_that_is_a_missing_path(tmp_path, capsys) -> None:
    missing = tmp_path / "no" / "such-model"
    assert _model_error(capsys, tmp_path, missing) == (
        f"halos sft: error: --model '{missing}': no such folder")
    assert _model_error(capsys, tmp_path, "./nothing-here") == (
        "halos sft: error: --model './nothing-here': no such folder")
    assert _model_error(capsys, tmp_path, "m") == (
        "halos sft: error: --model 'm': no such folder (a Hub model id has the form owner/name)")


def test_model_that_is_a_file_or_not_a_model_folder(tmp_path, capsys) -> None:
    file = tmp_path / "config.json"
    file.write_text("{}")
    assert _model_error(capsys, tmp_path, file) == (
        f"halos sft: error: --model '{file}' is a file; give the model's folder (config.json, "
        f"weights, tokenizer) or a Hub id owner/name")
    folder = tmp_path / "empty"
    folder.mkdir()
    assert _model_error(capsys, tmp_path, folder) == (
        f"halos sft: error: --model '{folder}' has no config.json: not a saved model folder "
        f"(save_pretrained writes one)")
    (folder / "config.json").write_text("{}")
    assert _model_error(capsys, tmp_path, folder).startswith(
        f"halos sft: error: --model '{folder}' has no tokenizer files (tokenizer.json, ")


def test_hub_id_offline_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _model_error(capsys, tmp_path, "nobody-xyz/no-model") == (
        "halos sft: error: --model 'nobody-xyz/no-model': no such folder, and as a Hub id it is not "
        "in the Hugging Face cache while HF_HUB_OFFLINE is set; download it first "
        "(hf download nobody-xyz/no-model) or give a local folder")


def test_ppo_models_are_resolved_the_same_way(tmp_path, capsys) -> None:
    policy = tmp_path / "policy"  # what resolution looks for; nothing is loaded
    policy.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (policy / name).write_text("{}")
    err = _halos_error(capsys, "ppo", "--model", policy, "--data", tmp_path, "--out",
                       tmp_path / "o", "--reward-model", tmp_path / "rm")
    assert err == f"halos ppo: error: --reward-model '{tmp_path / 'rm'}': no such folder"


def test_eval_commands_resolve_the_model_the_same_way(tmp_path, capsys) -> None:
    missing = tmp_path / "results" / "dpo" / "model"
    for command in (["sample", "--prompts", tmp_path / "p.jsonl"],
                    ["eval", "preference", "--data", tmp_path]):
        err = _halos_error(capsys, *command, "--model", missing, "--out", tmp_path / "o")
        assert err == f"halos {command[0]}: error: --model '{missing}': no such folder"


# --- 12. prepare and command-line faults ---------------------------------------------------------

def test_loader_option_typo_in_prepare(tmp_path, capsys) -> None:
    err = _data_error(capsys, "prepare", "--loader", "synthetic", "--source", "synthetic",
                      "--out", tmp_path / "o", "--option", "n_trian=5")
    assert err == ("error: loader 'synthetic' has no option 'n_trian'; valid options: "
                   "heldout_fraction, max_operand, n_prompts, n_sft, n_test, n_train, sft_mix")
    err = _data_error(capsys, "prepare", "--loader", "local", "--source", _one_file(tmp_path),
                      "--out", tmp_path / "o", "--option", "nam=x")
    assert err == "error: loader 'local' has no option 'nam'; valid options: name"
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.write_text("keep me")
    for command in (["prepare", "--loader", "local", "--source", str(_one_file(tmp_path))],
                    ["synthetic"], ["mix", str(tmp_path), str(tmp_path)]):
        err = _data_error(capsys, *command, "--out", out)
        assert err == f"error: --out {out} is a file; give a folder path (it is written atomically)"
    assert out.read_text() == "keep me"


def test_jsonl_whose_first_line_is_an_array(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('["not", "an", "object"]\n' + json.dumps(_paired("q", "a", "b")) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:1: expected a JSON object, got list"):
        read_rows(path)
    path = path.rename(tmp_path / "rows.json")  # a .json file may be JSON lines too
    with pytest.raises(DataError, match=rf"^{path}:1: expected a JSON object, got list"):
        read_rows(path)


def test_utf8_bom_is_read(tmp_path) -> None:
    rows = [_paired("q1", "a", "b"), _paired("q2", "c", "d")]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert [r["prompt"][0]["content"] for r in read_rows(path)] == ["q1", "q2"]
    assert len(read_rows(path, on_error="skip")) == 2
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert len(read_rows(array)) == 2


def test_json_error_text_says_at_once(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "unterminated')  # no newline: a newline in a string is its own error
    with pytest.raises(DataError) as err:
        read_rows(path)
    assert "Unterminated string starting at column 12" in str(err.value)
    assert "at at" not in str(err.value)


def test_negative_number_is_a_value_then_refused_by_validation(tmp_path, capsys) -> None:
    err = _halos_error(capsys, "sft", "--model", "m", "--data", tmp_path, "--out", tmp_path / "o",
                       "--learning-rate", "-1e-3")
    assert err == "halos sft: error: --learning-rate must be a number > 0, got -0.001"
    from halos.cli import _config_from, _train_parser

    argv = ["--loss", "dpo", "--beta", "-1e-2", "--learning-rate", "1e-3"]
    cfg = _config_from(_train_parser("align", argv).parse_args(argv), {})
    assert cfg.loss_params == {"beta": -0.01} and cfg.learning_rate == 0.001


# --- 13. written files and folders follow the umask --------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_respect_the_umask(tmp_path, umask_022) -> None:
    with atomic_file(tmp_path / "f.txt") as handle:
        handle.write("x")
    with atomic_dir(tmp_path / "d") as folder:
        (folder / "inner.txt").write_text("y")
    assert _mode(tmp_path / "f.txt") == 0o644 and _mode(tmp_path / "d") == 0o755
    os.umask(0o077)
    with atomic_file(tmp_path / "private.txt") as handle:
        handle.write("x")
    assert _mode(tmp_path / "private.txt") == 0o600


def test_atomic_dir_gives_privately_written_files_plain_modes(tmp_path, umask_022) -> None:
    """safetensors (under transformers 5) writes model.safetensors 0600: the exported folder
    still follows the umask, an executable keeps its x bits."""
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "sub").mkdir()
        for name in ("model.safetensors", "sub/w.bin", "run.sh"):
            (folder / name).write_text("z")
            os.chmod(folder / name, 0o600)
        os.chmod(folder / "run.sh", 0o700)
    out = tmp_path / "model"
    assert _mode(out / "model.safetensors") == _mode(out / "sub" / "w.bin") == 0o644
    assert _mode(out / "run.sh") == 0o755


def test_prepared_dataset_is_readable_by_others(tmp_path, umask_022) -> None:
    prepare_dataset("local", str(_one_file(tmp_path)), tmp_path / "o")
    assert _mode(tmp_path / "o") == 0o755
    assert {_mode(p) for p in (tmp_path / "o").iterdir()} == {0o644}


def test_right_values_pass_as_their_declared_type() -> None:
    from halos.config import checked_options

    assert checked_options({"max_steps": 3.0, "learning_rate": 1, "adam_betas": [0, 0.5],
                            "length_bucketing": False, "lr_schedule": "linear"}) == {
        "max_steps": 3, "learning_rate": 1.0, "adam_betas": [0.0, 0.5],
        "length_bucketing": False, "lr_schedule": "linear"}
