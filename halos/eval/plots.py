"""Leaderboard plots (PNG, matplotlib's Agg backend, written atomically).

* winrate_vs_size.png   win rate against the baseline vs model size, one line per loss, 90% CI
                        error bars, one panel per dataset (the KTO paper's figure)
* winrate_heatmap.png   model × loss heat map of the win rate (annotated; * = CI excludes 0.5)
* reward_accuracy.png   held-out reward accuracy per loss (bars, one per model) with the judge
                        score of the same models as markers: the two can disagree
"""

from __future__ import annotations

import io
from pathlib import Path

SIZE_PLOT, HEATMAP, REWARD_PLOT = "winrate_vs_size.png", "winrate_heatmap.png", "reward_accuracy.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from halos.io import atomic_file

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
    plt = _plt()
    datasets = _datasets(judged)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.4 * len(datasets), 4.6), squeeze=False)
    models = _models(rows)
    use_size = all(r.get("size") for r in judged)
    losses = _losses(judged, baseline)
    markers = "osD^v<>PX*"
    colors = plt.get_cmap("tab10" if len(losses) <= 10 else "tab20")
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, loss in enumerate(losses):
            points = [r for r in judged if r["dataset"] == dataset and r["loss"] == loss]
            if not points:
                continue
            points.sort(key=lambda r: models.index(r["model"]))
            dodge = (i - (len(losses) - 1) / 2) * min(0.03, 0.25 / max(1, len(losses)))
            xs = [r["size"] * 10 ** dodge if use_size else models.index(r["model"]) + dodge
                  for r in points]
            ys = [r["win_rate"] for r in points]
            lo = [r["win_rate"] - (r.get("ci90_lo") if r.get("ci90_lo") is not None else r["win_rate"])
                  for r in points]
            hi = [(r.get("ci90_hi") if r.get("ci90_hi") is not None else r["win_rate"]) - r["win_rate"]
                  for r in points]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[i % len(markers)], capsize=4,
                        linewidth=1.8, markersize=7, label=loss, color=colors(i % colors.N))
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.text(1.0, 0.5, f" = {baseline}", transform=ax.get_yaxis_transform(), va="center",
                ha="left", color="grey", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"win rate vs {baseline} (ties = ½; 90% CI)")
        if use_size:
            here = [r for r in judged if r["dataset"] == dataset]
            sizes = sorted({r["size"] for r in here})
            names = {s: sorted({r["model"] for r in here if r["size"] == s}) for s in sizes}
            ax.set_xscale("log")
            ax.set_xticks(sizes)
            ax.set_xticklabels(["/".join(names[s]) + f"\n{_size_label(s)}" for s in sizes])
            ax.minorticks_off()
            if len(sizes) == 1:
                ax.set_xlim(sizes[0] / 2, sizes[0] * 2)
            ax.set_xlabel("model (parameters, log scale)")
        else:
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels(models)
            ax.set_xlabel("model")
        ax.set_title(f"{dataset}: judged win rate vs model size")
        ax.grid(alpha=0.3)
        ax.legend(title="loss", fontsize=9, loc="upper left", bbox_to_anchor=(1.08, 1))
    return _save(fig, path)


def winrate_heatmap(rows: list[dict], path: Path, baseline: str) -> Path | None:
    import numpy as np

    judged = [r for r in rows if r.get("win_rate") is not None]
    if not judged:
        return None
    plt = _plt()
    datasets = _datasets(judged)
    models = _models(judged)
    losses = _losses(judged, baseline)
    width = max(4.5, 1.1 * len(losses) + 2.5)
    fig, axes = plt.subplots(1, len(datasets), figsize=(width * len(datasets), 0.8 * len(models) + 2),
                             squeeze=False)
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    image = None
    for ax, dataset in zip(axes[0], datasets, strict=True):
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
        ax.set_xticks(range(len(losses)))
        ax.set_xticklabels(losses, rotation=30, ha="right")
        ax.set_yticks(range(len(models)))
        sizes = {r["model"]: r.get("size") for r in rows}
        ax.set_yticklabels([f"{m} ({_size_label(sizes.get(m))})" if sizes.get(m) else m
                            for m in models])
        ax.set_xlabel("loss")
        ax.set_title(f"{dataset}: win rate vs {baseline}  (* = 90% CI excludes 0.5)")
    cbar = fig.colorbar(image, ax=axes[0].tolist(), fraction=0.046, pad=0.04)
    cbar.set_label(f"win rate vs {baseline}")
    return _save(fig, path)


def reward_accuracy(rows: list[dict], path: Path, baseline: str) -> Path | None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    have = [r for r in rows if r.get("reward_accuracy") is not None
            or r.get("logp_accuracy") is not None]
    if not have:
        return None
    plt = _plt()
    datasets = _datasets(have)
    all_models = _models(have)
    colors = plt.get_cmap("tab10")
    panels = []
    for dataset in datasets:
        here = [r for r in have if r["dataset"] == dataset]
        panels.append((dataset, here, [m for m in all_models if any(r["model"] == m for r in here)],
                       _losses(here, baseline, judged_only=False)))
    widths = [max(3.5, 0.35 * len(losses) * len(models) + 1.5) for _, _, models, losses in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 2.5, 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    any_hatched = any_judged = False
    for ax, (dataset, here, models, losses) in zip(axes[0], panels, strict=True):
        bar = 0.8 / len(models)
        for k, model in enumerate(models):
            color = colors(all_models.index(model) % 10)
            for j, loss in enumerate(losses):
                r = next((r for r in here if r["model"] == model and r["loss"] == loss), None)
                if r is None:
                    continue
                x = j - 0.4 + bar * (k + 0.5)
                value, hatch = r.get("reward_accuracy"), None
                if value is None:  # no reference: the policy's own log-prob ranking
                    value, hatch = r.get("logp_accuracy"), "//"
                    any_hatched = True
                ax.bar([x], [value], width=bar * 0.92, color=color, alpha=0.85, hatch=hatch,
                       edgecolor="white")
                if r.get("judge_score") is not None:
                    any_judged = True
                    ax.scatter([x], [r["judge_score"]], marker="D", s=46, color="black",
                               edgecolor="white", zorder=3)
        ax.set_xticks(range(len(losses)))
        ax.set_xticklabels(losses, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(losses) - 0.4)
        ax.set_ylim(0, 1.05)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{dataset}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("held-out reward accuracy (bars)\njudge score (◆)")
    handles = [Patch(color=colors(i % 10), alpha=0.85, label=m) for i, m in enumerate(all_models)]
    if any_hatched:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="log-prob accuracy\n(no reference)"))
    if any_judged:
        handles.append(Line2D([], [], marker="D", color="black", linestyle="none",
                              markeredgecolor="white", markersize=7, label="judge score"))
    axes[0][-1].legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Reward accuracy on held-out pairs vs the judge's score of the samples",
                 fontsize=11)
    return _save(fig, path)


def make_plots(rows: list[dict], out_dir: str | Path, baseline: str = "sft") -> list[Path]:
    out_dir = Path(out_dir)
    made = [winrate_vs_size(rows, out_dir / SIZE_PLOT, baseline),
            winrate_heatmap(rows, out_dir / HEATMAP, baseline),
            reward_accuracy(rows, out_dir / REWARD_PLOT, baseline)]
    return [p for p in made if p is not None]

