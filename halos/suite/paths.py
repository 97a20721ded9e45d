"""The artifact layout, spelled once: every path the rules declare and the jobs receive.

    data/{dataset}/                                  prepared data (shared by every suite)
    models/{model}/                                  built-in tiny base models (shared)
    results/{suite}/{model}/{dataset}/sft/           the SFT stage of a (model, dataset)
    results/{suite}/{model}/{dataset}/ref_logps.pt   its reference log-probs (ref_logps_base.pt:
                                                     the base model's), shared by every loss row
    results/{suite}/{model}/{dataset}/{loss}/        one run: model/, eval/, metrics.jsonl
    results/{suite}/leaderboard.{md,csv}, plots/     the suite's leaderboard
    logs/{suite}/{rule}/...                          each job's log and benchmark TSV

Data and base models depend only on their own table row, so suites share them; everything a
loss or model row's hyperparameters shape lives under the suite's name, so two suites with
different `sft+dpo` rows never overwrite each other. Called without names, a method returns the
Snakemake pattern (`{model}`, `{dataset}`, `{loss}` left as wildcards).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SFT = "sft"  # the loss row (and class) that is the SFT stage
MODEL_DIR = "model"  # a training job's final Hugging Face folder, inside its run folder
ADAPTER_DIR = "adapter"  # a LoRA run's peft adapter, beside model/ (then the merged model)
METRICS_FILE = "metrics.jsonl"  # a training job's metrics, one JSON line per logged step
EVAL_DIR = "eval"
REFERENCE_FILES = {False: "ref_logps.pt", True: "ref_logps_base.pt"}  # keyed by `base`
M, D, L = "{model}", "{dataset}", "{loss}"


def data_dir(dataset: str = D) -> str:
    return f"data/{dataset}"


def base_model_dir(model: str = M) -> str:
    return f"models/{model}"


def run_labels(run: Path) -> dict[str, str]:
    """{model, dataset, loss} of a run folder `.../{model}/{dataset}/{loss}`."""
    return {"model": run.parent.parent.name, "dataset": run.parent.name, "loss": run.name}


@dataclass(frozen=True)
class Layout:
    """Paths of one suite."""

    suite: str

    @property
    def results(self) -> str:
        return f"results/{self.suite}"

    def pair(self, model: str = M, dataset: str = D) -> str:
        """What every loss row of one (model, dataset) shares: SFT and reference log-probs."""
        return f"{self.results}/{model}/{dataset}"

    def run(self, model: str = M, dataset: str = D, loss: str = L) -> str:
        return f"{self.pair(model, dataset)}/{loss}"

    def model(self, model: str = M, dataset: str = D, loss: str = L) -> str:
        return f"{self.run(model, dataset, loss)}/{MODEL_DIR}"

    def sft(self, model: str = M, dataset: str = D) -> str:
        return self.run(model, dataset, SFT)

    def reference(self, model: str = M, dataset: str = D, base: bool = False) -> str:
        return f"{self.pair(model, dataset)}/{REFERENCE_FILES[base]}"

    def eval_dir(self, model: str = M, dataset: str = D, loss: str = L) -> str:
        return f"{self.run(model, dataset, loss)}/{EVAL_DIR}"

    def eval_file(self, name: str, model: str = M, dataset: str = D, loss: str = L) -> str:
        return f"{self.eval_dir(model, dataset, loss)}/{name}"

    def published(self, model: str = M, dataset: str = D, loss: str = L) -> str:
        return f"{self.run(model, dataset, loss)}/published.json"

    def leaderboard(self, suffix: str) -> str:
        return f"{self.results}/leaderboard.{suffix}"

    def plan(self, suffix: str) -> str:
        """`halos plan`'s table (md, csv), rewritten by the report job beside the leaderboard."""
        return f"{self.results}/plan.{suffix}"

    @property
    def plots(self) -> str:
        return f"{self.results}/plots"

    def log(self, rule: str, keys: str, suffix: str = "log") -> str:
        """`logs/{suite}/{rule}/{keys}.{suffix}`; keys such as "{model}/{dataset}/{loss}"."""
        return f"logs/{self.suite}/{rule}/{keys}.{suffix}"
