"""What a run really cost, beside what the plan said: the Snakemake benchmark TSVs of its jobs
(wall seconds, CPU seconds, max RSS of the job's processes) and the trainer's own peak memory
(`peak_memory` in model/halos_training.json: max RSS, peak GPU memory on a GPU).

A run folder results/{suite}/{model}/{dataset}/{loss} names its suite, so its jobs' TSVs are
logs/{suite}/{rule}/{model}/{dataset}/{loss}.benchmark.tsv beside results/ (`benchmark_files`,
the one place that maps a run folder to its TSVs, through halos.suite.paths.Layout.log).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from halos.suite.paths import Layout

TRAIN_RULES = ("sft", "align", "ppo")  # a run's own training job (one of them exists)
EVAL_RULES = ("evaluate", "eval_preference", "eval_judge")
PAIR_RULES = ("ref_logps", "ref_logps_base")  # shared by the runs of a (model, dataset)


@dataclass(frozen=True)
class Benchmark:
    seconds: float
    cpu_seconds: float
    max_rss_mb: float | None


def read_benchmark(path: Path) -> Benchmark:
    """One Snakemake benchmark TSV (header s, h:m:s, max_rss, ..., cpu_time); repeated
    measurements (`repeat()`) are averaged. ValueError naming the file on a bad one."""
    try:
        records = list(csv.DictReader(path.open(), delimiter="\t"))
        values = [(float(r["s"]), _number(r.get("cpu_time")), _number(r.get("max_rss")))
                  for r in records]
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a Snakemake benchmark TSV ({err}); rerun its job") from err
    if not values:
        raise ValueError(f"{path}: no benchmark record; rerun its job")
    rss = [v[2] for v in values if v[2] is not None]
    return Benchmark(sum(v[0] for v in values) / len(values),
                     sum(v[1] or 0.0 for v in values) / len(values), max(rss) if rss else None)


def _number(text: str | None) -> float | None:
    if text in (None, "", "NA", "-"):
        return None
    value = float(text)
    return None if math.isnan(value) else value


def run_parts(run: Path) -> tuple[Path, str, str, str, str] | None:
    """(repo root, suite, model, dataset, loss) of results/{suite}/{model}/{dataset}/{loss};
    None for a folder outside that layout (it has no benchmark files)."""
    run = Path(run).absolute()
    if len(run.parents) < 5 or run.parents[3].name != "results":
        return None
    return run.parents[3].parent, run.parents[2].name, run.parents[1].name, run.parent.name, run.name


def benchmark_files(run: Path) -> dict[str, Path]:
    """{rule: TSV} of the jobs of one run that have a benchmark file: its training job, its
    evals, and the reference log-probs of its (model, dataset)."""
    if run_parts(run) is None:
        return {}
    root, suite, model, dataset, loss = run_parts(run)
    layout = Layout(suite)
    keys = {rule: f"{model}/{dataset}/{loss}" for rule in TRAIN_RULES[1:] + EVAL_RULES}
    keys["sft"] = f"{model}/{dataset}"  # the SFT rule has no {loss} wildcard
    keys.update({rule: f"{model}/{dataset}" for rule in PAIR_RULES})
    if loss != "sft":
        keys.pop("sft")
    found = {rule: root / layout.log(rule, key, "benchmark.tsv") for rule, key in keys.items()}
    return {rule: path for rule, path in found.items() if path.is_file()}


def trainer_peak(run: Path) -> dict:
    """`peak_memory` of the run's halos_training.json ({} if the trainer recorded none)."""
    path = Path(run) / "model" / "halos_training.json"
    try:
        return json.loads(path.read_text()).get("peak_memory") or {}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------ the leaderboard
COST_COLUMNS = ["train_rule", "train_s", "train_cpu_h", "train_max_rss_mb", "gpu_peak_mb",
                "eval_s", "planned_train_s", "train_device_h", "measured_vs_planned"]


def plan_file(run: Path) -> Path | None:
    """The plan CSV of a run folder's suite (None outside the results/ layout)."""
    parts = run_parts(run)
    return None if parts is None else parts[0] / Layout(parts[1]).plan("csv")


def read_plan(path: Path | None) -> dict[tuple[str, str, str, str], dict]:
    """{(rule, model, dataset, loss): plan CSV row} ({} without a plan)."""
    if path is None or not path.is_file():
        return {}
    with path.open() as handle:
        return {(r["rule"], r["model"], r["dataset"], r["loss"]): r
                for r in csv.DictReader(handle)}


def run_cost(run: Path, plan: dict | None = None) -> dict:
    """Measured cost columns of one run folder, beside the plan's figure for its training job."""
    run = Path(run)
    if run_parts(run) is None:
        return {}
    _, _, model, dataset, loss = run_parts(run)
    plan = read_plan(plan_file(run)) if plan is None else plan
    files = benchmark_files(run)
    cost: dict = {"_jobs": {}}
    for rule, path in files.items():
        cost["_jobs"][str(path)] = (rule, model, dataset, "" if rule in PAIR_RULES else loss,
                                    read_benchmark(path))
    train = next(((r, cost["_jobs"][str(files[r])][-1]) for r in TRAIN_RULES if r in files), None)
    if train is not None:
        rule, bench = train
        cost.update(train_rule=rule, train_s=bench.seconds, train_cpu_h=bench.cpu_seconds / 3600,
                    train_max_rss_mb=bench.max_rss_mb)
        planned = plan.get((rule, model, dataset, loss))
        if planned:
            cost["planned_train_s"] = float(planned["wall_hours"]) * 3600
            cost["train_device_h"] = bench.seconds * int(planned["devices"]) / 3600
            cost["measured_vs_planned"] = bench.seconds / max(cost["planned_train_s"], 1e-9)
    evals = [cost["_jobs"][str(files[r])][-1].seconds for r in EVAL_RULES if r in files]
    cost["eval_s"] = sum(evals) if evals else None
    cost["gpu_peak_mb"] = trainer_peak(run).get("gpu_max_allocated_mb")
    return cost


def suite_total(rows: list[dict], plan: dict) -> dict[str, float]:
    """Every job with a TSV among these runs (shared reference jobs once) against the plan's
    figure for the same jobs: wall seconds, CPU hours, planned seconds, their ratio."""
    jobs = {path: job for row in rows for path, job in (row.get("_jobs") or {}).items()}
    pairs = [(job[-1].seconds, plan.get(job[:4])) for job in jobs.values()]
    planned = sum(float(p["wall_hours"]) * 3600 for _, p in pairs if p)
    measured_planned = sum(seconds for seconds, p in pairs if p)  # the ratio's numerator
    return {"jobs": len(jobs), "wall_s": sum(seconds for seconds, _ in pairs),
            "cpu_h": sum(job[-1].cpu_seconds for job in jobs.values()) / 3600,
            "planned_s": planned, "planned_jobs": sum(1 for _, p in pairs if p),
            "ratio": measured_planned / planned if planned else None}


def _cell(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def cost_markdown(rows: list[dict], plan: dict) -> list[str]:
    """The leaderboard's "Cost" section: per run, measured beside planned; the suite total."""
    if not any(r.get("_jobs") for r in rows):
        return []
    lines = ["", "## Cost: measured vs planned", "",
             "Training job wall time and CPU-hours from its Snakemake benchmark TSV "
             "(logs/{suite}/{rule}/…), peak GPU memory as the trainer recorded it, the plan's "
             "estimate (`halos plan`, results/{suite}/plan.csv) and measured / planned.", "",
             "| model | dataset | loss | train s | CPU-h | max RSS MB | GPU peak MB | eval s "
             "| planned s | device-h | measured / planned |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dataset']} | {r['loss']} | {_cell(r.get('train_s'))} "
                     f"| {_cell(r.get('train_cpu_h'), 3)} | {_cell(r.get('train_max_rss_mb'), 0)} "
                     f"| {_cell(r.get('gpu_peak_mb'), 0)} | {_cell(r.get('eval_s'))} "
                     f"| {_cell(r.get('planned_train_s'))} | {_cell(r.get('train_device_h'), 3)} "
                     f"| {_cell(r.get('measured_vs_planned'), 2)} |")
    t = suite_total(rows, plan)
    ratio = f"{t['ratio']:.2f}" if t["ratio"] is not None else "no plan"
    lines += ["", f"**Suite total**: {t['jobs']} jobs, {t['wall_s'] / 3600:.3f} h wall, "
              f"{t['cpu_h']:.3f} CPU-h measured; planned {t['planned_s'] / 3600:.3f} h for the "
              f"{t['planned_jobs']} jobs the plan covers; measured / planned {ratio} (on those)."]
    return lines
