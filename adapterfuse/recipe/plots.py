"""The figures a recipe run ends with: a metric against counted cost, a per-task heat map, and one
reliability diagram per predictor (its top-class confidence against its accuracy, per task).

Every figure is written to a temporary name and renamed, so a kill never leaves half a PNG.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

# The figure's size in points: the overlap logic of the cost plot works in these units so that markers
# never cover each other however the scores bunch up.
_AXES_W, _AXES_H, _MARKER = 380.0, 330.0, 13.0
GROUPS = {
    "backend": ("tab:blue", "o", "no task id"),
    "task_id": ("tab:orange", "D", "needs the task id"),
    "reference": ("grey", "s", "base zero-shot"),
}


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported here: only a run that draws needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(xs: list[float], ys: list[float]) -> tuple[tuple[float, float], tuple[float, float]]:
    """The cost plot's axis limits (before markers are moved apart): a margin around the points."""
    x_pad, y_pad = max(max(xs) - min(xs), 1.0) * 0.2, max(max(ys) - min(ys), 0.05) * 0.1
    return (min(xs) - x_pad, max(xs) + x_pad), (min(ys) - y_pad, max(ys) + y_pad)


def marker_offsets(xs: list[float], ys: list[float]) -> list[float]:
    """Horizontal offsets that keep the cost plot's markers apart.

    Where points of one cost have values closer than a marker's height, each moves one marker width right
    of the last, in the units of ``xs``.

    Args:
        xs: the points' x positions (``log2`` passes).
        ys: their values.

    Returns:
        One offset per point, to add to its x position.
    """
    (x0, x1), (y0, y1) = _limits(xs, ys)
    dx, dy = _MARKER / _AXES_W * (x1 - x0), _MARKER / _AXES_H * (y1 - y0)
    offsets = [0.0] * len(xs)
    for x in sorted(set(xs)):
        column = sorted((i for i in range(len(xs)) if xs[i] == x), key=lambda i: ys[i])
        placed: list[int] = []
        for i in column:
            near = [j for j in placed if abs(ys[i] - ys[j]) < dy]
            taken = {round(offsets[j] / dx) for j in near}
            offsets[i] = dx * min(k for k in range(len(column) + 1) if k not in taken)
            placed.append(i)
    return offsets


def plot_cost(points: list[dict[str, Any]], path: Path, title: str, ylabel: str, column: str = "score") -> None:
    """Draw the metric-vs-cost figure from :func:`~adapterfuse.recipe.report.cost_plot_data`'s points.

    Args:
        points: the markers, each with its predictor, value (``"score"``), passes and place.
        path: the PNG to write (atomically).
        title: the figure's title.
        ylabel: the value axis's label.
        column: the heading of the value column in the table beside the plot (the metric's short name).
    """
    plt = _pyplot()
    fig, (ax, side) = plt.subplots(1, 2, figsize=(10, 5.5), gridspec_kw={"width_ratios": [1.6, 1]})
    for group, (colour, marker, meaning) in GROUPS.items():
        mine = [p for p in points if p["group"] == group]
        ax.scatter(
            [p["x"] for p in mine],
            [p["score"] for p in mine],
            s=_MARKER**2,
            c=colour,
            marker=marker,
            label=meaning,
            zorder=3,
            edgecolors=["black" if p["on_front"] else "white" for p in mine],
            linewidths=[1.6 if p["on_front"] else 0.8 for p in mine],
        )
        for p in mine:
            ax.annotate(
                str(p["number"]),
                (p["x"], p["score"]),
                ha="center",
                va="center",
                fontsize=6.5,
                color="white",
                weight="bold",
                zorder=4,
            )
    xs, ys = [math.log2(max(p["passes"], 1e-3)) for p in points], [p["score"] for p in points]
    (x0, x1), y_lim = _limits(xs, ys)
    ax.set_xlim(x0, x1 + max(p["x"] - x for p, x in zip(points, xs, strict=True)))
    ax.set_ylim(*y_lim)
    ticks = list(range(math.floor(min(xs)), math.ceil(max(xs)) + 1))  # 1, 2, 4, 8 ... passes
    ax.set_xticks(ticks, [f"{2**t:g}" for t in ticks])
    ax.set_xlabel("base forward passes per input (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # a ringed marker is on the front; an empty ring stands for that in the legend
    ax.scatter(
        [], [], s=_MARKER**2, facecolors="none", edgecolors="black", linewidths=1.6, label="Pareto front (no task id)"
    )
    ax.legend(loc="lower right", fontsize=8, markerscale=0.6)
    _side_table(side, points, column)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _side_table(side: Any, points: list[dict[str, Any]], column: str) -> None:
    """The markers' numbers with their predictors, values (under ``column``) and passes, beside the plot."""
    side.axis("off")
    rows = [f"{p['number']:>2}  {p['predictor'][:34]:<34} {p['score']:>5.3f}  {p['passes']:g}" for p in points]
    text = "\n".join([f"{'#':>2}  {'predictor':<34} {column[:5]:>5}  passes", *rows])
    side.text(0, 1, text, va="top", family="monospace", fontsize=7, transform=side.transAxes)


def plot_heatmap(results: list[dict[str, Any]], names: list[str], tasks: list[str], path: Path, title: str) -> None:
    """Draw each predictor's (row, named ``names``) dev score per task (column)."""
    plt = _pyplot()
    grid = [[r["tasks"][t]["score"] if t in r["tasks"] else float("nan") for t in tasks] for r in results]
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 3, 0.42 * len(results) + 1.5))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(results)), names, fontsize=8)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.5 else "black"
            )
    fig.colorbar(image, ax=ax, label="dev score")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # a kill never leaves half a PNG
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def plot_reliability(results: list[dict[str, Any]], path: Path, title: str, columns: int = 4) -> bool:
    """Draw one reliability diagram per predictor that has one (classification tasks): a line per task
    from bin to bin of confidence, against the diagonal of perfect calibration.

    Returns:
        Whether anything was drawn (no result with ``"reliability"``: no file).
    """
    drawn = [r for r in results if r.get("reliability")]
    if not drawn:
        return False
    plt = _pyplot()
    rows = math.ceil(len(drawn) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.0 * rows + 0.6), squeeze=False)
    for ax, r in zip(axes.flat, drawn, strict=False):
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        for task, curve in r["reliability"].items():
            ax.plot(curve["confidence"], curve["accuracy"], marker="o", markersize=2.5, linewidth=1, label=task)
        ax.set_title(r["predictor"][:40], fontsize=8)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    fig.supxlabel("confidence of the top class (bin mean)", fontsize=8)
    fig.supylabel("accuracy (bin mean)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True
