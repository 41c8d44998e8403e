"""The comparison a recipe run ends with: a Markdown table, accuracy against cost, a per-task heat map.

Cost is measured, not counted: milliseconds per input, from the examples/s the harness timed while
it evaluated each predictor on this machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adapterfuse.harness import uncertainty_table
from adapterfuse.io.atomic import write_text
from adapterfuse.tasks.glue import get_task

REFERENCES = ("base zero-shot", "oracle")


def ms_per_input(result: dict[str, Any]) -> float:
    """Measured wall milliseconds per evaluated input."""
    return 1000.0 / max(result["examples_per_s"], 1e-9)


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


def _tasks(results: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(t for r in results for t in r["tasks"]))


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per predictor: each task's score, the average, the average over the oracle's, the cost."""
    tasks = _tasks(results)
    oracle = next((r["average"] for r in results if r["predictor"] == "oracle"), None)
    front = set(pareto_front([(ms_per_input(r), r["average"]) for r in results]))
    head = [
        "predictor",
        *[f"{t} ({'/'.join(get_task(t).metrics)})" for t in tasks],
        "average",
        "÷ oracle",
        "ms/input",
        "passes/input",
        "adapter params",
        "fit s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(results):
        name = f"**{r['predictor']}**" if i in front else r["predictor"]
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
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_cost(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    points = [(ms_per_input(r), r["average"]) for r in results]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ref = [r["predictor"] in REFERENCES for r in results]  # baselines drawn apart from the backends
    for is_ref, style in (
        (False, dict(color="tab:blue", marker="o", label="backends")),
        (True, dict(color="grey", marker="s", label="base zero-shot / oracle")),
    ):
        xs = [p for p, flag in zip(points, ref, strict=True) if flag == is_ref]
        ax.scatter([p[0] for p in xs], [p[1] for p in xs], zorder=3, **style)
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        color="tab:red",
        lw=1.5,
        ls="--",
        marker="o",
        zorder=2,
        label="Pareto front",
    )
    for (x, y), r in zip(points, results, strict=True):
        ax.annotate(r["predictor"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("measured cost: ms per input (log scale)")
    ax.set_ylabel("average dev score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _plot_heatmap(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(results)
    grid = [[r["tasks"][t]["score"] if t in r["tasks"] else float("nan") for t in tasks] for r in results]
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 3, 0.42 * len(results) + 1.5))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(results)), [r["predictor"] for r in results], fontsize=8)
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
        f"# {name}: results\n\nAverage of each task's official score on the test split (GLUE dev); cost "
        "measured on this machine. Bold: on the accuracy-vs-cost Pareto front.\n\n" + table + "\n"
    )
    if any("nll" in m for r in results for m in r["tasks"].values()):
        text += "\n## How sure each predictor is\n\n" + uncertainty_table(results) + "\n"
    write_text(out / "results.md", text)
    files = ["results.md"]
    if plots and results:
        _plot_cost(results, out / "accuracy_vs_cost.png", f"{name}: accuracy vs cost")
        _plot_heatmap(results, out / "scores_heatmap.png", f"{name}: dev score per task")
        files += ["accuracy_vs_cost.png", "scores_heatmap.png"]
    return files
