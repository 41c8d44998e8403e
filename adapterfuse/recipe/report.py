"""The comparison a recipe run ends with: a Markdown table, accuracy against cost, a per-task heat map.

The plot's cost is counted, not timed: base forward passes per input (from each predictor's ``Cost``),
which does not move when the machine is busy; the table also gives the measured milliseconds per input.
Predictors that are told each input's task (the oracle, one parameter-efficient ensemble per task) are
drawn apart and kept off the Pareto front: the others must find the task themselves.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from adapterfuse.harness import uncertainty_table
from adapterfuse.io.atomic import write_text
from adapterfuse.tasks.glue import get_task

REFERENCES = ("base zero-shot", "oracle")
# The figure's size in points: the overlap logic below works in these units so that markers never cover
# each other however the scores bunch up.
_AXES_W, _AXES_H, _MARKER = 380.0, 330.0, 13.0
GROUPS = {
    "backend": ("tab:blue", "o", "no task id"),
    "task_id": ("tab:orange", "D", "needs the task id"),
    "reference": ("grey", "s", "base zero-shot"),
}


def ms_per_input(result: dict[str, Any]) -> float:
    """Measured wall milliseconds per evaluated input."""
    return 1000.0 / max(result["examples_per_s"], 1e-9)


def needs_task_id(result: dict[str, Any]) -> bool:
    """Whether a result's predictor was told each input's task (the oracle always is)."""
    return bool(result.get("needs_task_id")) or result["predictor"] == "oracle"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and score (higher), by cost.

    Args:
        points: ``(cost, score)`` pairs.

    Returns:
        The front's indices, cheapest first.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def cost_front(results: list[dict[str, Any]]) -> list[int]:
    """The Pareto front of average score against base forward passes per input, among the results whose
    predictor needs no task id; indices into ``results``, cheapest first."""
    eligible = [i for i, r in enumerate(results) if not needs_task_id(r)]
    points = [(results[i]["cost"]["forward_passes"], results[i]["average"]) for i in eligible]
    return [eligible[j] for j in pareto_front(points)]


def _dodge(xs: list[float], ys: list[float], x_span: float, y_span: float) -> list[float]:
    """Horizontal offsets (in units of ``log2`` passes) that keep markers of one cost apart when their
    scores are closer than a marker: each such point moves one marker width right of the last."""
    dx, dy = _MARKER / _AXES_W * x_span, _MARKER / _AXES_H * y_span
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


def _limits(xs: list[float], ys: list[float]) -> tuple[tuple[float, float], tuple[float, float]]:
    """The cost plot's axis limits (before markers are moved apart): a margin around the points."""
    x_pad, y_pad = max(max(xs) - min(xs), 1.0) * 0.2, max(max(ys) - min(ys), 0.05) * 0.1
    return (min(xs) - x_pad, max(xs) + x_pad), (min(ys) - y_pad, max(ys) + y_pad)


def cost_plot_data(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the accuracy-vs-cost figure draws: one point per result, numbered for the side table.

    Returns:
        Per result, in order: ``number`` (1-based), ``predictor``, ``passes`` (base forward passes per
        input), ``score`` (the average), ``group`` (``backend``, ``task_id`` or ``reference``),
        ``on_front`` (the Pareto front among predictors that need no task id), and ``x`` (``log2``
        passes, moved right where markers of one cost would overlap).
    """
    front = set(cost_front(results))
    xs = [math.log2(max(r["cost"]["forward_passes"], 1e-3)) for r in results]
    ys = [r["average"] for r in results]
    (x0, x1), (y0, y1) = _limits(xs, ys)
    offsets = _dodge(xs, ys, x1 - x0, y1 - y0)
    points = []
    for i, r in enumerate(results):
        group = "task_id" if needs_task_id(r) else "reference" if r["predictor"] in REFERENCES else "backend"
        points.append(
            {
                "number": i + 1,
                "predictor": r["predictor"],
                "passes": r["cost"]["forward_passes"],
                "score": r["average"],
                "group": group,
                "on_front": i in front,
                "x": xs[i] + offsets[i],
            }
        )
    return points


def _tasks(results: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(t for r in results for t in r["tasks"]))


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per predictor: each task's score, the average, the average over the oracle's, the cost."""
    tasks = _tasks(results)
    oracle = next((r["average"] for r in results if r["predictor"] == "oracle"), None)
    front = set(cost_front(results))
    routed = any("routing_accuracy" in r for r in results)
    head = [
        "predictor",
        *[f"{t} ({'/'.join(get_task(t).metrics)})" for t in tasks],
        "average",
        "÷ oracle",
        "ms/input",
        "passes/input",
        "adapter params",
        "fit s",
        *(["routing acc."] if routed else []),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(results):
        name = f"**{r['predictor']}**" if i in front else r["predictor"]
        name += " (task id)" if needs_task_id(r) else ""
        cells = [name] + [f"{r['tasks'][t]['score']:.3f}" if t in r["tasks"] else "—" for t in tasks]
        norm = f"{r['average'] / oracle:.2f}" if oracle and oracle > 0 else "—"
        cost = r["cost"]
        cells += [
            f"{r['average']:.3f}",
            norm,
            f"{ms_per_input(r):.1f}",
            f"{cost['forward_passes']:g}",
            f"{cost['stored_params']:,}",
            f"{r.get('fit_seconds', 0):.0f}",
        ]
        if routed:
            cells.append(f"{r['routing_accuracy']:.3f}" if "routing_accuracy" in r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def held_out_table(results: list[dict[str, Any]]) -> str:
    """One row per predictor scored on held-out tasks: each one's score and the out-of-task AUROC."""
    scored = [r for r in results if "out_of_task_auroc" in r]
    tasks = list(dict.fromkeys(t for r in scored for t in r.get("held_out", {})))
    members = any("out_of_task_auroc_mi" in r for r in scored)
    head = ["predictor", *[f"{t} ({'/'.join(get_task(t).metrics)})" for t in tasks], "out-of-task AUROC"]
    head += ["out-of-task AUROC, disagreement"] if members else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in scored:
        held = r.get("held_out", {})
        cells = [r["predictor"]] + [f"{held[t]['score']:.3f}" if t in held else "—" for t in tasks]
        cells.append(f"{r['out_of_task_auroc']:.3f}")
        if members:
            cells.append(f"{r['out_of_task_auroc_mi']:.3f}" if "out_of_task_auroc_mi" in r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_cost(results: list[dict[str, Any]], path: Path, title: str) -> list[dict[str, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = cost_plot_data(results)
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
    ax.set_ylabel("average dev score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # a ringed marker is on the front; an empty ring stands for that in the legend
    ax.scatter(
        [], [], s=_MARKER**2, facecolors="none", edgecolors="black", linewidths=1.6, label="Pareto front (no task id)"
    )
    ax.legend(loc="lower right", fontsize=8, markerscale=0.6)
    _side_table(side, points)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return points


def _side_table(side: Any, points: list[dict[str, Any]]) -> None:
    """The markers' numbers with their predictors, scores and passes, beside the plot."""
    side.axis("off")
    rows = [f"{p['number']:>2}  {p['predictor'][:34]:<34} {p['score']:.3f}  {p['passes']:g}" for p in points]
    text = "\n".join([f"{'#':>2}  {'predictor':<34} score  passes", *rows])
    side.text(0, 1, text, va="top", family="monospace", fontsize=7, transform=side.transAxes)


def _plot_heatmap(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(results)
    grid = [[r["tasks"][t]["score"] if t in r["tasks"] else float("nan") for t in tasks] for r in results]
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 3, 0.42 * len(results) + 1.5))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    names = [r["predictor"] + (" (task id)" if needs_task_id(r) else "") for r in results]
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


def write_report(summary: dict[str, Any], out: Path, plots: bool = True) -> list[str]:
    """Write ``results.md`` and, with ``plots``, ``accuracy_vs_cost.png`` and ``scores_heatmap.png``.

    Args:
        summary: what :func:`~adapterfuse.recipe.runner.run_recipe` measured.
        out: the run folder.
        plots: draw the two figures (needs matplotlib).

    Returns:
        The names of the files written.
    """
    results, name = summary["results"], summary["recipe"]
    table = markdown_table(results)
    text = (
        f"# {name}: results\n\nAverage of each task's official score on the test split (GLUE dev); ms/input "
        "measured on this machine. Bold: on the Pareto front of average score against base forward passes "
        "per input, among the predictors not told the task (those marked 'task id' are).\n\n" + table + "\n"
    )
    if any("nll" in m for r in results for m in r["tasks"].values()):
        text += "\n## How sure each predictor is\n\n" + uncertainty_table(results) + "\n"
    if any("out_of_task_auroc" in r for r in results):
        text += (
            "\n## Tasks no expert was trained for\n\nEach held-out task's score (not in the average above), and "
            "the AUROC of the predictive entropy (divided by log of the number of label words) at telling "
            "those inputs from the recipe's own: 0.5 is chance, 1 a perfect separation. Predictors told the "
            "task have no answer for a task without an expert (—); their AUROC is the mean over tasks of "
            "each task's own predictor telling its inputs from the held-out ones. Ensembles are also scored "
            "by their members' disagreement (mutual information, on the same scale).\n\n"
            + held_out_table(results)
            + "\n"
        )
    write_text(out / "results.md", text)
    files = ["results.md"]
    if plots and results:
        _plot_cost(results, out / "accuracy_vs_cost.png", f"{name}: accuracy vs cost")
        _plot_heatmap(results, out / "scores_heatmap.png", f"{name}: dev score per task")
        files += ["accuracy_vs_cost.png", "scores_heatmap.png"]
    return files
