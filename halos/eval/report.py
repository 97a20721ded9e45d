"""`halos report`: a suite's eval JSONs → results/{suite}/leaderboard.{md,csv} and plots/.

One row per run folder `results/{suite}/{model}/{dataset}/{loss}/` given (the suite's runs, never
a glob over every suite) that has eval outputs:

* eval/judge.json (or the only eval/judge_*.json): win rate against the baseline (SFT) with its
  90% interval and sign-test p-value; `p_holm` is Holm-corrected over the losses compared with
  the baseline within each model × dataset. Other judge_*.json files add `win_rate_<name>`.
* eval/preference.json: reward and log-prob accuracy on held-out pairs.
* eval/lm_eval.json: one column per task metric (`task/metric`).

Missing values are blank. The baseline's own judge score comes from its siblings' judge files.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from halos.eval import stats
from halos.suite.paths import run_labels

BASE_COLUMNS = ["model", "size", "dataset", "loss", "judge", "n", "win_rate", "ci90_lo",
                "ci90_hi", "p_value", "p_holm", "judge_score", "win_rate_vs_chosen",
                "reward_accuracy", "reward_margin", "logp_accuracy", "logp_margin"]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerun the eval that writes it") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _judge_files(eval_dir: Path) -> tuple[Path | None, dict[str, Path]]:
    files = sorted(eval_dir.glob("judge*.json"))
    primary = eval_dir / "judge.json"
    if primary.is_file():
        extra = {p.stem[len("judge_"):]: p for p in files if p != primary and p.stem.startswith("judge_")}
        return primary, extra
    if len(files) == 1:
        return files[0], {}
    return None, {p.stem[len("judge_"):]: p for p in files if p.stem.startswith("judge_")}


def run_dirs_under(results: str | Path) -> list[Path]:
    """The run folders `{model}/{dataset}/{loss}` of one suite's results folder."""
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"--results {str(root)!r}: no such folder")
    from halos.eval.progress import is_unfinished

    evaluated = {d.parent for d in root.glob("*/*/*/eval") if d.is_dir()}
    return sorted(evaluated | {m.parent for m in root.glob("*/*/*/metrics.jsonl")
                               if is_unfinished(m.parent)})


def collect_rows(run_dirs: list[str | Path], baseline_loss: str = "sft") -> list[dict]:
    """One leaderboard row per run folder `.../{model}/{dataset}/{loss}` with eval outputs."""
    rows = [row for run in run_dirs if (row := _run_row(Path(run))) is not None]
    _fill_baseline_scores(rows, baseline_loss)
    _holm(rows, baseline_loss)
    rows.sort(key=lambda r: (r["dataset"], r["size"] or 0, r["model"],
                             r["loss"] != baseline_loss, r["loss"]))
    return rows


def _run_row(run: Path) -> dict | None:
    from halos.eval.models import parameter_count
    from halos.plan.measured import run_cost

    eval_dir = run / "eval"
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"{run}: no eval/ folder; run its evaluations first")
    primary, extra = _judge_files(eval_dir)
    preference, lm_eval = eval_dir / "preference.json", eval_dir / "lm_eval.json"
    if primary is None and not extra and not preference.is_file() and not lm_eval.is_file():
        return None
    row: dict = {**run_labels(run), "size": parameter_count(run / "model") if (run / "model").is_dir() else None}
    row.update(run_cost(run))  # measured cost (benchmark TSVs) beside the plan's
    if primary is not None:
        row.update(_judge_columns(_read_json(primary)))
    for name, path in extra.items():
        judged = _read_json(path)
        ci = judged.get("ci90") or [None, None]
        row.update({f"win_rate_{name}": judged.get("win_rate"), f"ci90_lo_{name}": ci[0],
                    f"ci90_hi_{name}": ci[1]})
    if preference.is_file():
        pref = _read_json(preference)
        row.update({k: pref.get(k) for k in ("reward_accuracy", "reward_margin", "logp_accuracy",
                                             "logp_margin")})
    if lm_eval.is_file():
        for task, metrics in (_read_json(lm_eval).get("tasks") or {}).items():
            row.update({f"{task}/{metric}": value for metric, value in (metrics or {}).items()})
    return row


def _judge_columns(judged: dict) -> dict:
    ci = judged.get("ci90") or [None, None]
    return {"judge": judged.get("judge"), "n": judged.get("n"), "win_rate": judged.get("win_rate"),
            "ci90_lo": ci[0], "ci90_hi": ci[1], "p_value": judged.get("p_value"),
            "judge_score": judged.get("judge_score"),
            "_baseline_score": judged.get("baseline_score"),
            "win_rate_vs_chosen": (judged.get("against_chosen") or {}).get("win_rate")}


def _fill_baseline_scores(rows: list[dict], baseline_loss: str) -> None:
    """The baseline has no judge.json of its own; its judge score is in its siblings'."""
    for row in rows:
        if row["loss"] != baseline_loss or row.get("judge_score") is not None:
            continue
        scores = [r.get("_baseline_score") for r in rows if r["model"] == row["model"]
                  and r["dataset"] == row["dataset"] and r.get("_baseline_score") is not None]
        if scores:
            row["judge_score"] = scores[0]
            row["judge"] = next(r.get("judge") for r in rows if r["model"] == row["model"]
                                and r["dataset"] == row["dataset"]
                                and r.get("_baseline_score") is not None)


def _holm(rows: list[dict], baseline_loss: str) -> None:
    families: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["loss"] != baseline_loss and row.get("p_value") is not None:
            families.setdefault((row["model"], row["dataset"]), []).append(row)
    for family in families.values():
        for row, adjusted in zip(family, stats.holm([r["p_value"] for r in family]), strict=True):
            row["p_holm"] = adjusted


def columns(rows: list[dict]) -> list[str]:
    from halos.plan.measured import COST_COLUMNS

    known = BASE_COLUMNS + COST_COLUMNS
    extra = sorted({k for r in rows for k in r if k not in known and not k.startswith("_")
                    and "/" not in k})
    lm = sorted({k for r in rows for k in r if "/" in k})
    return known + extra + lm


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    from halos.files import atomic_file

    cols = columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_csv_value(row.get(c)) for c in cols])
    with atomic_file(path) as handle:
        handle.write(buffer.getvalue())


def human_size(n: int | None) -> str:
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _f(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _p(value) -> str:
    if value is None:
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def markdown(rows: list[dict], baseline_loss: str, plots: list[Path], out: Path) -> str:
    lm_cols = [c for c in columns(rows) if "/" in c and not c.endswith("_stderr")]
    extra_judges = sorted({k[len("win_rate_"):] for r in rows for k in r
                           if k.startswith("win_rate_") and k != "win_rate_vs_chosen"})
    header = (["model", "size", "dataset", "loss", f"win rate vs {baseline_loss} (90% CI)",
               "p (Holm)", "judge score", "win rate vs chosen"]
              + [f"win rate [{j}]" for j in extra_judges]
              + ["reward acc", "log-prob acc"] + lm_cols)
    lines = [
        "# Leaderboard", "",
        f"Win rate of each model's samples against the `{baseline_loss}` model of the same base "
        "model and dataset, as judged pairwise (ties count as half a win); the interval is the "
        f"{stats.CI_NOTE}. p: {stats.P_VALUE_NOTE}, Holm-corrected over the losses compared with "
        f"`{baseline_loss}` within each model × dataset. **bold ▲** = better than `{baseline_loss}` "
        f"(the interval lies above 0.5), _italic ▼_ = worse (below 0.5). "
        "Judge score = the judge's absolute score of the model's own samples (for the synthetic "
        "judge: the fraction of correct answers).", "",
        "Reward accuracy (held-out implicit rewards) alone can look excellent while the policy got "
        "worse: read it beside the judged columns.", "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|",
    ]
    for r in rows:
        win = ""
        if r.get("win_rate") is not None:
            win = f"{r['win_rate']:.3f} [{_f(r.get('ci90_lo'))}, {_f(r.get('ci90_hi'))}]"
            lo, hi = r.get("ci90_lo"), r.get("ci90_hi")
            if lo is not None and lo > 0.5:
                win = f"**{win}** ▲"
            elif hi is not None and hi < 0.5:
                win = f"_{win}_ ▼"
        cells = [r["model"], human_size(r.get("size")), r["dataset"], r["loss"], win,
                 _p(r.get("p_holm")), _f(r.get("judge_score")), _f(r.get("win_rate_vs_chosen"))]
        cells += [_f(r.get(f"win_rate_{j}")) for j in extra_judges]
        cells += [_f(r.get("reward_accuracy")), _f(r.get("logp_accuracy"))]
        cells += [_f(r.get(c)) for c in lm_cols]
        lines.append("| " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "## Plots", ""]
        for plot in plots:
            rel = plot.relative_to(out.parent) if plot.is_relative_to(out.parent) else plot
            lines += [f"![{plot.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"


def cost_section(rows: list[dict], run_dirs: list[str | Path]) -> list[str]:
    """Measured cost per run and for the suite, beside the plan (halos/plan/measured.py)."""
    from halos.plan.measured import cost_markdown, plan_file, read_plan

    return cost_markdown(rows, read_plan(plan_file(Path(run_dirs[0])))) if run_dirs else []


def check_wins(rows: list[dict], losses: list[str], baseline_loss: str) -> None:
    """ValueError unless every judged row of each loss in `losses` beats the baseline with a
    90% interval above 0.5 (and each such loss has at least one judged row)."""
    problems = []
    for loss in losses:
        judged = [r for r in rows if r["loss"] == loss and r.get("win_rate") is not None]
        if not judged:
            problems.append(f"{loss}: no judged results")
        for r in judged:
            if r.get("ci90_lo") is None or r["ci90_lo"] <= 0.5:
                problems.append(f"{r['model']}/{r['dataset']}/{loss}: win rate "
                                f"{r['win_rate']:.3f}, 90% CI [{_f(r.get('ci90_lo'))}, "
                                f"{_f(r.get('ci90_hi'))}] does not exclude 0.5")
    if problems:
        raise ValueError(f"--require-win: not every listed loss beats {baseline_loss}: "
                         + "; ".join(problems))


def report(run_dirs: list[str | Path], out: str | Path, baseline_loss: str = "sft",
           plots_dir: str | Path | None = None, require_win: list[str] | None = None) -> dict:
    """The leaderboard of exactly these run folders (one suite's runs)."""
    from halos.eval.plots import make_plots
    from halos.eval.progress import is_unfinished, markdown_section, unfinished_runs
    from halos.eval.report_page import markdown_to_rst
    from halos.files import atomic_file

    out = Path(out)
    if out.suffix != ".md":
        raise ValueError(f"--out {str(out)!r}: expected a .md file (the .csv is written beside it)")
    unfinished = unfinished_runs(run_dirs)  # still training: listed apart, with their last step
    rows = collect_rows([r for r in run_dirs if not is_unfinished(Path(r))], baseline_loss)
    if not rows:
        raise ValueError(f"no results: none of the {len(run_dirs)} run folders has an eval/ "
                         f"folder with preference.json, judge*.json or lm_eval.json")
    plots_dir = Path(plots_dir) if plots_dir else out.parent / "plots"
    plots = make_plots(rows, plots_dir, baseline_loss)
    write_csv(rows, out.with_suffix(".csv"))
    text = (markdown(rows, baseline_loss, plots, out)
            + "".join(line + "\n" for line in markdown_section(unfinished))
            + "".join(line + "\n" for line in cost_section(rows, run_dirs)))
    with atomic_file(out) as handle:
        handle.write(text)
    with atomic_file(out.with_suffix(".rst")) as handle:  # the HTML report's page (report.rst)
        handle.write(markdown_to_rst(text, out.parent))
    if require_win:
        check_wins(rows, require_win, baseline_loss)
    return {"rows": len(rows), "markdown": str(out), "csv": str(out.with_suffix(".csv")),
            "plots": [str(p) for p in plots]}
