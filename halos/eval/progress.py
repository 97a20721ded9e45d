"""Runs of a suite still training: a metrics.jsonl but no model/ yet. `halos report` lists them
with their last logged step beside the leaderboard of the finished runs, so a report made while
the suite runs (`halos report --results results/SUITE --out …`) shows where each run is."""

from __future__ import annotations

import json
import time
from pathlib import Path

from halos.suite.paths import METRICS_FILE, MODEL_DIR, run_labels


def is_unfinished(run: Path) -> bool:
    """Training has written metrics but not its final model (running, or killed)."""
    return (run / METRICS_FILE).is_file() and not (run / MODEL_DIR).exists()


def last_step(metrics: Path) -> tuple[int, float | None] | None:
    """(the highest step logged, the train loss at it) of a metrics.jsonl; a torn last line
    (a kill mid-write) is skipped; None if no row has a step."""
    step, loss = None, None
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        if step is None or row["step"] > step:
            step, loss = row["step"], None
        if row["step"] == step and row.get("split") == "train":
            loss = row.get("loss", loss)
    return None if step is None else (step, loss)


def unfinished_runs(run_dirs: list[str | Path]) -> list[dict]:
    """One row per unfinished run folder `.../{model}/{dataset}/{loss}`: its last step, the
    train loss there and when metrics.jsonl was last written (UTC)."""
    rows = []
    for run in map(Path, run_dirs):
        if not is_unfinished(run):
            continue
        last = last_step(run / METRICS_FILE)
        written = (run / METRICS_FILE).stat().st_mtime
        rows.append({**run_labels(run), "step": None if last is None else last[0],
                     "train_loss": None if last is None else last[1],
                     "updated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(written))})
    return rows


def markdown_section(rows: list[dict]) -> list[str]:
    """The report's "Unfinished runs" section (no lines when every run has finished)."""
    if not rows:
        return []
    lines = ["", "## Unfinished runs", "",
             "Still training (or stopped) when this report was made: not in the table above.", "",
             "| model | dataset | loss | last step | train loss | last logged |",
             "|---|---|---|---:|---:|---|"]
    for r in rows:
        loss = "" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        step = "" if r["step"] is None else str(r["step"])
        lines.append(f"| {r['model']} | {r['dataset']} | {r['loss']} | {step} | {loss} | "
                     f"{r['updated']} |")
    return lines
