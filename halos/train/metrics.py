"""Where metrics go: a JSONL file always, TensorBoard and W&B when asked, and a progress bar.

Only rank 0 writes. Values are reduced across ranks before they get here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


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


class MetricsLogger:
    def __init__(self, out: Path, *, enabled: bool, total_steps: int, run_name: str,
                 config: dict[str, Any], progress: bool, tensorboard: bool, wandb: bool,
                 wandb_project: str, start_step: int = 0):
        self.enabled = enabled
        self.jsonl = out / "metrics.jsonl"
        self.start = time.time()
        self.bar = None
        self.tb = self.wandb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if wandb:
            import wandb as wandb_module  # needs `pip install wandb` and `wandb login`

            self.wandb = wandb_module.init(project=wandb_project, name=run_name, config=config,
                                           resume="allow")

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
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
        if self.bar is not None and split == "train":
            shown = {k: metrics[k] for k in ("loss", "tokens_per_s") if k in metrics}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
