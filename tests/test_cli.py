"""Bad input to the CLI: a clear error naming the option or file, exit code 2, nothing written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import FAST, run_halos

from halos.cli import main
from halos.config import TrainConfig


def _error(capsys: pytest.CaptureFixture, *argv: str | Path) -> str:
    assert main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def test_missing_required_option_is_named(capsys, tmp_path: Path) -> None:
    err = _error(capsys, "sft", "--data", tmp_path, "--out", tmp_path / "out")
    assert "--model is required" in err


def test_missing_data_folder_is_named(capsys, tmp_path: Path) -> None:
    err = _error(capsys, "sft", "--model", "m", "--data", tmp_path / "nope", "--out", tmp_path)
    assert "--data" in err and "halos data prepare" in err


def test_inconsistent_lengths_are_refused(capsys, tmp_path: Path) -> None:
    err = _error(capsys, "sft", "--model", "m", "--data", tmp_path, "--out", tmp_path / "o",
                 "--max-length", "64", "--max-prompt-length", "64")
    assert "--max-prompt-length (64) must be smaller than --max-length (64)" in err


def test_unknown_yaml_key_names_the_file_and_key(capsys, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model: m\nlearning_rat: 0.1\n")
    err = _error(capsys, "sft", "--config", config)
    assert str(config) in err and "learning_rat" in err


def test_unknown_loss_lists_the_choices(capsys, tmp_path: Path) -> None:
    err = _error(capsys, "align", "--loss", "dpoo", "--model", "m", "--data", tmp_path,
                 "--out", tmp_path / "o")
    assert "unknown loss 'dpoo'" in err and "kto" in err


def test_unknown_loss_hyperparameter_from_yaml_is_named(capsys, tmp_path: Path,
                                                         tiny_model: Path) -> None:
    config = tmp_path / "run.yaml"  # a real model: a missing one is refused first
    config.write_text(f"loss: dpo\nloss_params: {{betta: 0.2}}\nmodel: {tiny_model}\ndata: {tmp_path}\n"
                      f"out: {tmp_path / 'o'}\n")
    err = _error(capsys, "align", "--config", config)
    assert "betta" in err and "beta=0.1" in err


def test_cli_overrides_yaml(tmp_path: Path) -> None:
    from halos.cli import _config_from, _train_parser

    config = tmp_path / "run.yaml"
    config.write_text("loss: dpo\nlearning_rate: 0.5\nloss_params: {beta: 0.3}\nseed: 7\n")
    argv = ["--config", str(config), "--learning-rate", "0.25", "--rpo-alpha", "1.0"]
    cfg = _config_from(_train_parser("align", argv).parse_args(argv), {})
    assert (cfg.learning_rate, cfg.seed, cfg.loss) == (0.25, 7, "dpo")
    assert cfg.loss_params == {"beta": 0.3, "rpo_alpha": 1.0}


def test_help_lists_every_option_and_the_loss_hyperparameters(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["align", "--loss", "kto", "--help"])
    text = capsys.readouterr().out
    from halos.cli import _NOT_FOR

    for field in dataclasses.fields(TrainConfig):
        if field.name not in _NOT_FOR["align"]:
            assert "--" + field.name.replace("_", "-") in text, field.name
    for hyper in ("--beta", "--desirable-weight", "--undesirable-weight"):
        assert hyper in text


def test_model_that_does_not_fit_max_length(tiny_model: Path, synthetic_data: Path,
                                            tmp_path: Path) -> None:
    result = run_halos("sft", "--model", tiny_model, "--data", synthetic_data, "--out", tmp_path,
                       *FAST, "--max-length", "4096", check=False)
    assert result.returncode == 2
    assert "--max-length 4096 exceeds" in result.stderr and "max_position_embeddings" in result.stderr
    assert not (tmp_path / "model").exists()


def test_empty_dataset_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    (data / "test.jsonl").write_text("")
    result = run_halos("align", "--loss", "slic", "--model", tiny_model, "--data", data,
                       "--out", tmp_path / "out", *FAST, check=False)
    assert result.returncode == 2
    assert "0 training examples" in result.stderr
    assert not (tmp_path / "out" / "model").exists()


def test_unknown_deepspeed_config_lists_the_shipped_ones(tiny_model: Path, synthetic_data: Path,
                                                        tmp_path: Path) -> None:
    fast = list(FAST)
    fast[fast.index("--deepspeed") + 1] = "zero9"
    result = run_halos("sft", "--model", tiny_model, "--data", synthetic_data, "--out", tmp_path,
                       *fast, check=False)
    assert result.returncode == 2
    assert "--deepspeed 'zero9'" in result.stderr and "zero3_offload" in result.stderr


def test_then_runs_commands_in_one_process_and_stops_at_the_first_failure(capsys) -> None:
    """`halos A --then B`: the evaluate job's three evals in one process (imports paid once)."""
    assert main(["losses", "--then", "losses"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) >= 2 and listed[: len(listed) // 2] == listed[len(listed) // 2:]
    assert main(["no-such-command", "--then", "losses"]) == 2
    assert "reference-free" not in capsys.readouterr().out  # the second command never ran
    with pytest.raises(SystemExit):  # argparse refuses the first command's options
        main(["eval", "preference", "--then", "losses"])
    assert "reference-free" not in capsys.readouterr().out
    assert main(["losses", "--then"]) == 2
    assert "--then joins two commands; one side of it is empty" in capsys.readouterr().err
