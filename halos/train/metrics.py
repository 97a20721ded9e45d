"""Where metrics go: metrics.jsonl always, TensorBoard and W&B when asked, and live progress (a
tqdm bar on a terminal; with --no-progress, as every DAG job runs, a line in the job's log at a
fixed interval that `tail -f logs/…` shows).

Only rank 0 writes. Values are reduced across ranks before they get here.

metrics.jsonl belongs to one run: a run that starts from step 0 (a first run, `--overwrite`)
starts a fresh file; a run resumed from the checkpoint of step N keeps the rows up to step N and
drops those a killed attempt wrote after it, so every step is logged exactly once.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from halos.config import ConfigError
from halos.files import atomic_file, keep_json_lines_up_to
from halos.plan.peak import peak_memory
from halos.suite.paths import METRICS_FILE

WANDB_ID_FILE = "wandb_id"  # the run's W&B id, so a resumed run continues the same W&B run
RESULTS = "results"  # the top folder of the suite layout results/{suite}/{model}/{dataset}/{loss}
# What a progress line shows of the latest train metrics: (metric, label), when present.
PROGRESS_FIELDS = (("loss", "loss"), ("objective/rlhf_reward", "reward"), ("objective/kl", "kl"),
                   ("tokens_per_s", "tokens/s"), ("eps", "episodes/s"))


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over all ranks (every rank must pass the same keys)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, tensor.tolist(), strict=True)}


def reduce_sum(value: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


# ----------------------------------------------------------------------------- progress lines
def duration(seconds: float) -> str:
    """3723.4 -> '1h02m03s', 65 -> '1m05s', 4.2 -> '4s'."""
    s = int(round(seconds))
    hours, minutes, secs = s // 3600, s // 60 % 60, s % 60
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def memory_text() -> str:
    """'peak RSS 812 MB' (+ ', GPU max allocated 3100 MB' on a GPU)."""
    peak = peak_memory()
    text = f"peak RSS {peak['max_rss_mb']:.0f} MB"
    if "gpu_max_allocated_mb" in peak:
        text += f", GPU max allocated {peak['gpu_max_allocated_mb']:.0f} MB"
    return text


PROGRESS_EVERY_S = 30.0  # eval jobs' progress lines; training jobs take --progress-every


class ProgressLines:
    """A line on stdout at the first step, then at most every `every` seconds, and at the last
    step: `[halos] NAME step 12/400 (3%) | loss 0.6931 | tokens/s 1.2e+04 | elapsed 1m02s |
    ETA 33m30s | peak RSS 812 MB`. The rate (and ETA) counts only the steps of this process, so
    a resumed run's ETA is right too."""

    def __init__(self, name: str, total: int, every: float, start_step: int = 0) -> None:
        self.name, self.total, self.every = name, total, max(0.0, every)
        self.restart(start_step)

    def restart(self, step: int) -> None:
        self.start_step, self.started, self.last_line = step, time.monotonic(), None

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        due = self.last_line is None or now - self.last_line >= self.every
        if due or step >= self.total:
            self.last_line = now
            print(self.line(step, metrics, now - self.started), flush=True)

    def line(self, step: int, metrics: dict[str, Any], elapsed: float) -> str:
        parts = [f"[halos] {self.name} step {step}/{self.total} "
                 f"({100 * step / max(1, self.total):.0f}%)"]
        parts += [f"{label} {metrics[key]:.4g}" for key, label in PROGRESS_FIELDS
                  if isinstance(metrics.get(key), (int, float))]
        parts.append(f"elapsed {duration(elapsed)}")
        done = step - self.start_step
        if 0 < done and step < self.total:
            parts.append(f"ETA {duration(elapsed / done * (self.total - step))}")
        return " | ".join([*parts, memory_text()])


# ----------------------------------------------------------------------------- W&B
def wandb_name_and_group(out: Path, run_name: str = "") -> tuple[str, str]:
    """A suite run `results/{suite}/{model}/{dataset}/{loss}` is W&B run `{loss}` in group
    `{suite}/{model}/{dataset}`, so a suite's runs of one model × dataset sit side by side;
    any other folder is named after itself, in the group of its parent folder's name."""
    parts = out.resolve().parts
    above = parts[:-1]
    group = above[-1] if above else ""
    if RESULTS in above[:-1]:
        top = len(above) - 1 - above[::-1].index(RESULTS)
        group = "/".join(above[top + 1:])
    return run_name or parts[-1], group


def wandb_run_id(out: Path, resumed: bool) -> str:
    """A resumed run continues its W&B run (the id kept in the run folder); a fresh one
    (first run, --overwrite) gets a new id."""
    path = out / WANDB_ID_FILE
    if resumed and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids: short, [a-z0-9]
    with atomic_file(path) as handle:
        handle.write(run_id + "\n")
    return run_id


def start_wandb(out: Path, run_name: str, project: str, config: dict[str, Any], resumed: bool):
    """A W&B run (needs `pip install wandb`; online needs `wandb login`, `WANDB_MODE=offline`
    needs nothing). Its files go to the run folder's wandb/ unless WANDB_DIR says otherwise."""
    import wandb

    name, group = wandb_name_and_group(out, run_name)
    return wandb.init(project=project, name=name, group=group, config=config,
                      id=wandb_run_id(out, resumed), resume="allow",
                      dir=os.environ.get("WANDB_DIR") or str(out), job_type=config.get("loss"),
                      tags=[t for t in group.split("/") if t])


# ----------------------------------------------------------------------------- the logger
class MetricsLogger:
    def __init__(self, out: Path, *, enabled: bool, total_steps: int, run_name: str,
                 config: dict[str, Any], progress: bool, tensorboard: bool, wandb: bool,
                 wandb_project: str, progress_every: float = 30.0, start_step: int | None = None):
        """`start_step`: the step a resumed run starts from, if known now; else `resume_at`
        says it (before the first `log`; without it the run counts as fresh)."""
        self.enabled, self.out = enabled, out
        self.jsonl = out / METRICS_FILE
        self.start = time.time()
        self.bar = self.lines = self.tb = self.wandb = None
        self.step, self.resumed = 0, False
        self.last_train: dict[str, float] = {}
        self._wandb_args = (run_name, wandb_project, config) if wandb else None
        if wandb and importlib.util.find_spec("wandb") is None:  # every rank: one clear error
            raise ConfigError("--wandb needs the wandb package: pip install wandb (or "
                              "pip install -e '.[logging]'), then `wandb login` or "
                              "WANDB_MODE=offline")
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        name = run_name or out.name
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=name, unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        else:
            self.lines = ProgressLines(name, total_steps, progress_every)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if start_step is not None:
            self.resume_at(start_step)

    def resume_at(self, step: int) -> None:
        """The run starts at `step` (0: from scratch): keep the metrics.jsonl rows up to it,
        drop the rest, and start W&B (continuing the run's W&B run when resumed)."""
        self.step, self.resumed = step, True
        if not self.enabled:
            return
        if step == 0 or not self.jsonl.is_file():
            with atomic_file(self.jsonl):
                pass  # a run from scratch (or --overwrite) starts a fresh file
        else:
            keep_json_lines_up_to(self.jsonl, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if self.lines is not None:
            self.lines.restart(step)
        if self._wandb_args is not None and self.wandb is None:
            self.wandb = start_wandb(self.out, *self._wandb_args, resumed=step > 0)

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        if not self.resumed:
            self.resume_at(0)
        row = {"step": step, "split": split, "time": round(time.time() - self.start, 3)}
        row.update({k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in metrics.items()})
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        named = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in named.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(named, step=step)
        if split == "train":
            self.last_train = metrics
            if self.bar is not None:
                shown = {k: metrics[k] for k in ("loss", "tokens_per_s") if k in metrics}
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})

    def advance(self, steps: int = 1) -> None:
        """`steps` more optimizer steps (PPO iterations) are done."""
        self.step += steps
        if self.bar is not None:
            self.bar.update(steps)
        if self.lines is not None:
            self.lines.update(self.step, self.last_train)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
