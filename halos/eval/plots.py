"""Leaderboard plots (PNG, matplotlib's Agg backend, written atomically).

* winrate_vs_size.png   win rate against the baseline vs model size, one line per loss, 90% CI
                        error bars, one panel per dataset (the KTO paper's figure)
* winrate_heatmap.png   model × loss heat map of the win rate (annotated; * = CI excludes 0.5)
* reward_accuracy.png   held-out reward accuracy per loss (bars, one per model) with the judge
                        score of the same models as markers: the two can disagree
* cost_vs_plan.png      each run's measured training time against the plan's (`halos plan`),
                        log-log, the diagonal = the plan exact
"""

from __future__ import annotations

import io
from pathlib import Path

SIZE_PLOT, HEATMAP, REWARD_PLOT = "winrate_vs_size.png", "winrate_heatmap.png", "reward_accuracy.png"
COST_PLOT = "cost_vs_plan.png"
MARKERS = "osD^v<>PX*"  # one per loss in the win rate vs size plot


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, figsize: tuple[float, float], **kw):
    """A figure with `n` panels side by side: (figure, row of axes)."""
    fig, axes = _plt().subplots(1, n, figsize=figsize, squeeze=False, **kw)
    return fig, axes[0]


def _loss_ticks(ax, losses: list[str]) -> None:
    ax.set_xticks(range(len(losses)))
    ax.set_xticklabels(losses, rotation=30, ha="right")


def _save(fig, path: Path) -> Path:
    from halos.files import atomic_file

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    with atomic_file(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def _models(rows: list[dict]) -> list[str]:
    sizes: dict[str, int] = {}
    for r in rows:
        sizes.setdefault(r["model"], r.get("size") or 0)
        sizes[r["model"]] = max(sizes[r["model"]], r.get("size") or 0)
    return sorted(sizes, key=lambda m: (sizes[m], m))


def _datasets(rows: list[dict]) -> list[str]:
    return sorted({r["dataset"] for r in rows})


def _losses(rows: list[dict], baseline: str, judged_only: bool = True) -> list[str]:
    names = {r["loss"] for r in rows if not judged_only or r.get("win_rate") is not None}
    names.discard(baseline) if judged_only else None
    return sorted(names, key=lambda n: (n != baseline, n))


def _size_label(n: int) -> str:
    from halos.eval.report import human_size

    return human_size(n)


def winrate_vs_size(rows: list[dict], path: Path, baseline: str) -> Path | None:
    judged = [r for r in rows if r.get("win_rate") is not None]
    if not judged:
        return None
    datasets = _datasets(judged)
    fig, axes = _panels(len(datasets), (6.4 * len(datasets), 4.6))
    models = _models(rows)
    use_size = all(r.get("size") for r in judged)
    losses = _losses(judged, baseline)
    colors = _plt().get_cmap("tab10" if len(losses) <= 10 else "tab20")
    for ax, dataset in zip(axes, datasets, strict=True):
        here = [r for r in judged if r["dataset"] == dataset]
        for i, loss in enumerate(losses):
            points = sorted((r for r in here if r["loss"] == loss),
                            key=lambda r: models.index(r["model"]))
            if points:
                xs = _dodged_x(points, i, len(losses), models, use_size)
                ax.errorbar(xs, [r["win_rate"] for r in points], yerr=_ci_errors(points),
                            marker=MARKERS[i % len(MARKERS)], capsize=4, linewidth=1.8,
                            markersize=7, label=loss, color=colors(i % colors.N))
        _win_rate_axis(ax, baseline)
        if use_size:
            _size_axis(ax, here)
        else:
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels(models)
            ax.set_xlabel("model")
        ax.set_title(f"{dataset}: judged win rate vs model size")
        ax.grid(alpha=0.3)
        ax.legend(title="loss", fontsize=9, loc="upper left", bbox_to_anchor=(1.08, 1))
    return _save(fig, path)


def _dodged_x(points: list[dict], i: int, n_losses: int, models: list[str],
              use_size: bool) -> list[float]:
    """x of each point, shifted a little per loss so that error bars at one size don't overlap
    (on the log size axis the shift is a fraction of a decade)."""
    dodge = (i - (n_losses - 1) / 2) * min(0.03, 0.25 / max(1, n_losses))
    return [r["size"] * 10 ** dodge if use_size else models.index(r["model"]) + dodge
            for r in points]


def _ci_errors(points: list[dict]) -> list[list[float]]:
    """Error bar lengths [below, above] each win rate to its 90% CI (0 where there is none)."""
    def bound(r: dict, key: str) -> float:
        return r[key] if r.get(key) is not None else r["win_rate"]

    return [[r["win_rate"] - bound(r, "ci90_lo") for r in points],
            [bound(r, "ci90_hi") - r["win_rate"] for r in points]]


def _win_rate_axis(ax, baseline: str) -> None:
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.text(1.0, 0.5, f" = {baseline}", transform=ax.get_yaxis_transform(), va="center",
            ha="left", color="grey", fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {baseline} (ties = ½; 90% CI)")


def _size_axis(ax, here: list[dict]) -> None:
    """A log x axis ticked at each model size, labelled with the models of that size."""
    sizes = sorted({r["size"] for r in here})
    names = {s: sorted({r["model"] for r in here if r["size"] == s}) for s in sizes}
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels(["/".join(names[s]) + f"\n{_size_label(s)}" for s in sizes])
    ax.minorticks_off()
    if len(sizes) == 1:
        ax.set_xlim(sizes[0] / 2, sizes[0] * 2)
    ax.set_xlabel("model (parameters, log scale)")


def winrate_heatmap(rows: list[dict], path: Path, baseline: str) -> Path | None:
    import numpy as np

    judged = [r for r in rows if r.get("win_rate") is not None]
    if not judged:
        return None
    datasets = _datasets(judged)
    models = _models(judged)
    losses = _losses(judged, baseline)
    width = max(4.5, 1.1 * len(losses) + 2.5)
    fig, axes = _panels(len(datasets), (width * len(datasets), 0.8 * len(models) + 2))
    cmap = _plt().get_cmap("RdBu").with_extremes(bad="#dddddd")
    image = None
    for ax, dataset in zip(axes, datasets, strict=True):
        grid = np.full((len(models), len(losses)), np.nan)
        marks = {}
        for r in judged:
            if r["dataset"] != dataset:
                continue
            i, j = models.index(r["model"]), losses.index(r["loss"])
            grid[i, j] = r["win_rate"]
            lo, hi = r.get("ci90_lo"), r.get("ci90_hi")
            marks[i, j] = lo is not None and hi is not None and (lo > 0.5 or hi < 0.5)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), significant in marks.items():
            value = grid[i, j]
            color = "white" if abs(value - 0.5) > 0.3 else "black"
            ax.text(j, i, f"{value:.2f}{'*' if significant else ''}", ha="center", va="center",
                    color=color, fontsize=10, fontweight="bold" if significant else "normal")
        _loss_ticks(ax, losses)
        ax.set_yticks(range(len(models)))
        sizes = {r["model"]: r.get("size") for r in rows}
        ax.set_yticklabels([f"{m} ({_size_label(sizes.get(m))})" if sizes.get(m) else m
                            for m in models])
        ax.set_xlabel("loss")
        ax.set_title(f"{dataset}: win rate vs {baseline}\n(* = 90% CI excludes 0.5)", fontsize=11)
    cbar = fig.colorbar(image, ax=axes.tolist(), fraction=0.046, pad=0.04)
    cbar.set_label(f"win rate vs {baseline}")
    return _save(fig, path)


def reward_accuracy(rows: list[dict], path: Path, baseline: str) -> Path | None:
    have = [r for r in rows if r.get("reward_accuracy") is not None
            or r.get("logp_accuracy") is not None]
    if not have:
        return None
    all_models = _models(have)
    colors = _plt().get_cmap("tab10")
    panels = []
    for dataset in _datasets(have):
        here = [r for r in have if r["dataset"] == dataset]
        panels.append((dataset, here, [m for m in all_models if any(r["model"] == m for r in here)],
                       _losses(here, baseline, judged_only=False)))
    widths = [max(3.5, 0.35 * len(losses) * len(models) + 1.5) for _, _, models, losses in panels]
    fig, axes = _panels(len(panels), (sum(widths) + 2.5, 4.6), gridspec_kw={"width_ratios": widths})
    any_hatched = any_judged = False
    for ax, (dataset, here, models, losses) in zip(axes, panels, strict=True):
        colors_of = {m: colors(all_models.index(m) % 10) for m in models}
        hatched, judged = _reward_bars(ax, here, models, losses, colors_of)
        any_hatched, any_judged = any_hatched or hatched, any_judged or judged
        _loss_ticks(ax, losses)
        ax.set_xlim(-0.6, len(losses) - 0.4)
        ax.set_ylim(0, 1.05)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{dataset}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("held-out reward accuracy (bars)\njudge score (◆)")
    axes[-1].legend(handles=_reward_legend(all_models, colors, any_hatched, any_judged),
                    fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Reward accuracy on held-out pairs vs the judge's score of the samples",
                 fontsize=11)
    return _save(fig, path)


def _reward_bars(ax, here: list[dict], models: list[str], losses: list[str],
                 colors: dict) -> tuple[bool, bool]:
    """One bar per loss and model, the judge score as a marker on it. Returns whether any bar
    is a log-prob accuracy (hatched) and whether any has a judge score."""
    hatched = judged = False
    bar = 0.8 / len(models)
    for k, model in enumerate(models):
        for j, loss in enumerate(losses):
            r = next((r for r in here if r["model"] == model and r["loss"] == loss), None)
            if r is None:
                continue
            x = j - 0.4 + bar * (k + 0.5)
            value, hatch = r.get("reward_accuracy"), None
            if value is None:  # no reference: the policy's own log-prob ranking
                value, hatch = r.get("logp_accuracy"), "//"
                hatched = True
            ax.bar([x], [value], width=bar * 0.92, color=colors[model], alpha=0.85, hatch=hatch,
                   edgecolor="white")
            if r.get("judge_score") is not None:
                judged = True
                ax.scatter([x], [r["judge_score"]], marker="D", s=46, color="black",
                           edgecolor="white", zorder=3, clip_on=False)  # whole at 0 and 1
    return hatched, judged


def _reward_legend(models: list[str], colors, hatched: bool, judged: bool) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=colors(i % 10), alpha=0.85, label=m) for i, m in enumerate(models)]
    if hatched:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="log-prob accuracy\n(no reference)"))
    if judged:
        handles.append(Line2D([], [], marker="D", color="black", linestyle="none",
                              markeredgecolor="white", markersize=7, label="judge score"))
    return handles


def cost_vs_plan(rows: list[dict], path: Path) -> Path | None:
    """Measured vs planned training seconds per run, one marker per model."""
    have = [r for r in rows if r.get("train_s") and r.get("planned_train_s")]
    if not have:
        return None
    fig, (ax,) = _panels(1, (5.6, 4.6))
    colors = _plt().get_cmap("tab10")
    for i, model in enumerate(_models(have)):
        mine = [r for r in have if r["model"] == model]
        ax.scatter([r["planned_train_s"] for r in mine], [r["train_s"] for r in mine],
                   color=colors(i % 10), label=model, s=36)
        for r in mine:
            ax.annotate(r["loss"], (r["planned_train_s"], r["train_s"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    values = [v for r in have for v in (r["train_s"], r["planned_train_s"])]
    low, high = min(values) / 1.5, max(values) * 1.5
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="= plan")
    ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high),
           xlabel="planned training time (s, halos plan)",
           ylabel="measured training time (s, benchmark TSV)")
    ax.set_title("Training cost: measured vs planned")
    for axis in (ax.xaxis, ax.yaxis):  # log-axis minor labels overlap on a narrow range
        axis.set_minor_formatter(_plt().NullFormatter())
        axis.set_major_formatter(_plt().FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def make_plots(rows: list[dict], out_dir: str | Path, baseline: str = "sft") -> list[Path]:
    out_dir = Path(out_dir)
    made = [winrate_vs_size(rows, out_dir / SIZE_PLOT, baseline),
            winrate_heatmap(rows, out_dir / HEATMAP, baseline),
            reward_accuracy(rows, out_dir / REWARD_PLOT, baseline),
            cost_vs_plan(rows, out_dir / COST_PLOT)]
    return [p for p in made if p is not None]

