"""Unit tests of training's building blocks: the DeepSpeed config checked against the run config,
the learning-rate schedule, and the metrics logger."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from halos.config import ConfigError, TrainConfig
from halos.train.engine import deepspeed_config, lr_lambda
from halos.train.metrics import MetricsLogger

# --- deepspeed_config ---------------------------------------------------------------------------

AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}


def run_config(tmp_path: Path, ds: dict, **options) -> TrainConfig:
    """A run config whose --deepspeed is `ds` written to a JSON file under tmp_path."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return TrainConfig(model="m", data=str(tmp_path), out=str(tmp_path / "out"),
                       deepspeed=str(path), **({"precision": "fp32"} | options))


def test_deepspeed_auto_fields_come_from_the_run_config(tmp_path: Path) -> None:
    ds = {**AUTO, "train_batch_size": "auto", "zero_optimization": {"stage": 2}}
    cfg = run_config(tmp_path, ds, micro_batch_size=8, gradient_accumulation_steps=3,
                     max_grad_norm=0.5, precision="bf16")
    assert deepspeed_config(cfg) == {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 3,
        "gradient_clipping": 0.5, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}


def test_deepspeed_missing_fields_count_as_auto(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, {"steps_per_print": 10}, micro_batch_size=2)
    assert deepspeed_config(cfg) == {
        "steps_per_print": 10, "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "bf16": {"enabled": False}}


def test_deepspeed_explicit_values_equal_to_the_run_config_are_kept(tmp_path: Path) -> None:
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
          "gradient_clipping": 1, "bf16": {"enabled": False}, "train_batch_size": 64}
    cfg = run_config(tmp_path, ds, micro_batch_size=8, gradient_accumulation_steps=2,
                     max_grad_norm=1.0)
    assert deepspeed_config(cfg) == {key: value for key, value in ds.items()
                                     if key != "train_batch_size"}


def test_deepspeed_named_config_is_filled(tmp_path: Path) -> None:
    cfg = TrainConfig(model="m", data=str(tmp_path), out=str(tmp_path / "out"), deepspeed="zero0",
                      micro_batch_size=5, gradient_accumulation_steps=4, max_grad_norm=0.0,
                      precision="fp32")
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 0
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["gradient_clipping"], ds["bf16"]) == (5, 4, 0.0, {"enabled": False})


@pytest.mark.parametrize(("ds", "options", "named"), [
    ({"train_micro_batch_size_per_gpu": 4}, {"micro_batch_size": 8},
     "train_micro_batch_size_per_gpu = 4 contradicts the run config (8)"),
    ({"gradient_accumulation_steps": 2}, {"gradient_accumulation_steps": 4},
     "gradient_accumulation_steps = 2 contradicts the run config (4)"),
    ({"gradient_clipping": 0.5}, {"max_grad_norm": 1.0},
     "gradient_clipping = 0.5 contradicts the run config (1.0)"),
    ({"bf16": {"enabled": True}}, {"precision": "fp32"},
     "bf16.enabled = True contradicts the run config (False)"),
])
def test_deepspeed_contradicting_values_are_refused(tmp_path: Path, ds: dict, options: dict,
                                                    named: str) -> None:
    cfg = run_config(tmp_path, {**AUTO, **ds}, **options)
    with pytest.raises(ConfigError) as error:
        deepspeed_config(cfg)
    assert str(error.value).startswith(f"{tmp_path / 'ds.json'}: {named}")
    assert json.loads((tmp_path / "ds.json").read_text()) == {**AUTO, **ds}  # file untouched


# --- lr_lambda ----------------------------------------------------------------------------------

def schedule(warmup_steps: float, total_steps: int, **options) -> list[float]:
    """The LR factor of every step 0..total_steps (one past the last, to see the clamp)."""
    cfg = TrainConfig(warmup_steps=warmup_steps, **options)
    factor = lr_lambda(cfg, total_steps)
    return [factor(step) for step in range(total_steps + 1)]


def test_warmup_ramps_linearly_to_the_peak() -> None:
    assert schedule(4, 8, lr_schedule="constant") == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_fractional_warmup_is_a_share_of_all_steps() -> None:
    factors = schedule(0.25, 40, lr_schedule="constant")
    assert factors[:11] == pytest.approx([(step + 1) / 10 for step in range(10)] + [1.0])
    # Rounded to whole steps, at least one: 0.01 * 10 steps is a one-step warmup.
    assert schedule(0.01, 10, lr_schedule="constant")[0] == 1.0
    assert schedule(0.0, 10, lr_schedule="constant")[0] == 1.0


def test_linear_decay_reaches_zero_at_the_end() -> None:
    factors = schedule(2, 12, lr_schedule="linear")
    assert factors[:2] == [0.5, 1.0]
    # Decay over the 10 steps after warmup: 1.0 at step 2 down to 0.0 at step 12.
    assert factors[2:] == pytest.approx([1.0 - k / 10 for k in range(11)])
    assert factors[12] == 0.0
    assert lr_lambda(TrainConfig(warmup_steps=2, lr_schedule="linear"), 12)(100) == 0.0


def test_cosine_decay_is_the_default() -> None:
    assert TrainConfig().lr_schedule == "cosine"
    factors = schedule(2, 12)
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[7] == pytest.approx(0.5)  # the midpoint of the decay
    assert factors[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert factors[12] == pytest.approx(0.0, abs=1e-12)
    assert factors == sorted(factors[:2]) + sorted(factors[2:], reverse=True)


# --- MetricsLogger ------------------------------------------------------------------------------

def logger(out: Path, *, enabled: bool = True, progress: bool = False,
           tensorboard: bool = False, start_step: int = 0) -> MetricsLogger:
    return MetricsLogger(out, enabled=enabled, total_steps=10, run_name="unit", config={},
                         progress=progress, tensorboard=tensorboard, wandb=False,
                         wandb_project="halos", start_step=start_step)


def test_log_appends_json_lines(tmp_path: Path) -> None:
    out = tmp_path / "run" / "nested"
    metrics = logger(out)
    assert out.is_dir()
    metrics.log(1, {"loss": 0.5, "accuracy": float("nan"), "tokens": 128})
    metrics.log(2, {"loss": 0.25}, split="eval")
    metrics.close()
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and text.count("\n") == 2
    first, second = (json.loads(line) for line in text.splitlines())
    assert list(first) == ["step", "split", "time", "loss", "accuracy", "tokens"]
    assert (first["step"], first["split"], first["loss"], first["accuracy"], first["tokens"]) == (
        1, "train", 0.5, None, 128)
    assert second == {"step": 2, "split": "eval", "time": second["time"], "loss": 0.25}
    assert 0.0 <= first["time"] <= second["time"] < 60.0


def test_a_resumed_log_appends_to_the_rows_before_its_start(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    metrics = logger(tmp_path, start_step=4)
    metrics.log(5, {"loss": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 0} and json.loads(lines[1])["step"] == 5


def test_disabled_logger_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    # Progress and TensorBoard are asked for but a disabled logger (rank > 0) starts neither.
    metrics = logger(out, enabled=False, progress=True, tensorboard=True)
    metrics.log(1, {"loss": 0.5})
    metrics.advance(3)
    metrics.message("not shown")
    metrics.close()
    assert not out.exists()
    assert metrics.bar is None and metrics.tb is None
    assert capsys.readouterr() == ("", "")


def test_message_advance_and_close_without_progress(tmp_path: Path, capsys) -> None:
    metrics = logger(tmp_path)
    metrics.advance(2)
    metrics.message("step 2 done")
    metrics.close()
    assert metrics.bar is None
    progress, message = capsys.readouterr().out.splitlines()  # no bar: a progress line
    assert progress.startswith("[halos] unit step 2/10 (20%) | ") and message == "step 2 done"


def test_progress_bar_counts_from_the_start_step(tmp_path: Path) -> None:
    metrics = logger(tmp_path, progress=True, start_step=4)
    metrics.advance()
    metrics.advance(2)
    metrics.log(7, {"loss": 0.123456, "tokens_per_s": 1000.0, "other": 1.0})
    assert metrics.bar.n == 7 and metrics.bar.total == 10
    assert metrics.bar.postfix == "loss=0.1235, tokens_per_s=1000"
    metrics.close()


def test_tensorboard_gets_the_numeric_metrics(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = logger(tmp_path, tensorboard=True)
    metrics.log(3, {"loss": 1.5, "note": "text is not a scalar"})
    metrics.log(4, {"loss": 0.75}, split="eval")
    metrics.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["eval/loss", "train/loss"]
    assert [(e.step, e.value) for e in accumulator.Scalars("train/loss")] == [(3, 1.5)]
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/loss")] == [(4, 0.75)]


def test_one_process_job_does_not_build_the_shm_op(tmp_path):
    """DeepSpeed's CPU backend JIT-compiles its shared-memory op (35-60 s on a fresh machine) at
    start-up; a one-process job never communicates, so it must start without building it, and
    a multi-process job builds it in a folder of this environment's own."""
    script = ("import deepspeed.ops, deepspeed.comm.comm as c, os\n"
              "from halos.train.distributed import SHM_OP, init_distributed\n"
              "print('@', init_distributed())\n"
              "print('@', c.cdb.shm_comm_op, deepspeed.ops.__compatible_ops__.get(SHM_OP),\n"
              "      os.environ['TORCH_EXTENSIONS_DIR'])\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_EXTENSIONS_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.splitlines()
    out = [line.removeprefix("@ ") for line in out if line.startswith("@ ")]
    assert out[0] == "(0, 1)"
    op, compatible, extensions = out[1].split()
    assert op == "None"  # not built, not loaded
    assert compatible in ("True", "None")  # restored for any later multi-process group
    assert extensions.startswith(str(tmp_path / "cache" / "torch_extensions" / "halos-"))
    assert not (tmp_path / "cache" / "torch_extensions").exists()
