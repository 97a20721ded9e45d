"""The plan as a table: one row per job, totals per model and for the suite (markdown, CSV)."""

from __future__ import annotations

import csv
import io

from halos.plan.hardware import GiB
from halos.plan.jobs import PlanRow

CSV_COLUMNS = ["rule", "model", "dataset", "loss", "tokens", "token_source", "steps", "pflops",
               "device", "devices", "wall_hours", "device_hours", "mem_per_gpu_gb",
               "device_mem_gb", "fits", "fix"]


def csv_row(row: PlanRow) -> dict:
    memory = row.memory.per_gpu / GiB if row.memory else None
    return {"rule": row.rule, "model": row.model, "dataset": row.dataset, "loss": row.loss,
            "tokens": row.tokens.total, "token_source": row.tokens.source,
            "steps": row.tokens.steps or "", "pflops": f"{row.flops / 1e15:.6g}",
            "device": row.device.name, "devices": row.devices,
            "wall_hours": f"{row.hours:.6g}", "device_hours": f"{row.device_hours:.6g}",
            "mem_per_gpu_gb": "" if memory is None else f"{memory:.2f}",
            "device_mem_gb": f"{row.device.memory_gb:.3g}", "fits": "yes" if row.fits else "NO",
            "fix": row.fix}


def to_csv(rows: list[PlanRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(r) for r in rows)
    return buffer.getvalue()


def totals(rows: list[PlanRow]) -> dict[str, dict[str, float]]:
    """{model: {...}} and "suite": tokens, PFLOPs, wall and device hours, jobs."""
    keys = [*dict.fromkeys(r.model for r in rows), "suite"]  # plan order, the suite last
    out = {key: {"jobs": 0, "tokens": 0, "pflops": 0.0, "wall_hours": 0.0, "device_hours": 0.0,
                 "not_fitting": 0} for key in keys}
    for row in rows:
        for key in (row.model, "suite"):
            t = out[key]
            t["jobs"] += 1
            t["tokens"] += row.tokens.total
            t["pflops"] += row.flops / 1e15
            t["wall_hours"] += row.hours
            t["device_hours"] += row.device_hours
            t["not_fitting"] += not row.fits
    return out


def _n(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _g(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(rows: list[PlanRow], title: str, assumptions: str) -> str:
    """Training jobs in full, the other jobs summed per model, and the totals."""
    lines = [f"# Plan: {title}", "", assumptions, "",
             "| model | dataset | loss | rule | tokens | PFLOPs | devices | wall h | device-h "
             "| mem/GPU GB | fits |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in (r for r in rows if r.memory is not None):
        memory = f"{r.memory.per_gpu / GiB:.1f} / {r.device.memory_gb:.3g}"
        fits = "yes" if r.fits else f"**no**: {r.fix}"
        lines.append(f"| {r.model} | {r.dataset} | {r.loss} | {r.rule} | {_n(r.tokens.total)}"
                     f"{'' if r.tokens.source == 'counted' else '*'} | {_g(r.flops / 1e15)} | "
                     f"{r.devices}× {r.device.name} | {_g(r.hours)} | {_g(r.device_hours)} | "
                     f"{memory} | {fits} |")
    lines += ["", "| model | jobs | tokens | PFLOPs | wall h | device-h | rows not fitting |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for key, t in totals(rows).items():
        name = "**suite total**" if key == "suite" else key
        lines.append(f"| {name} | {t['jobs']} | {_n(t['tokens'])} | {_g(t['pflops'])} | "
                     f"{_g(t['wall_hours'])} | {_g(t['device_hours'])} | {t['not_fitting']} |")
    lines += ["", "`*` estimated tokens (data not prepared or tokenizer not available: every "
              "sequence at max_length, an upper bound); the rest counted from the prepared data. "
              "Totals include reference log-probs, sampling and preference evals."]
    return "\n".join(lines) + "\n"
