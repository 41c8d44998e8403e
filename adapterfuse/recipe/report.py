"""The comparison a recipe run ends with: a Markdown table, accuracy against cost, a per-task heat map.

The plot's cost is counted, not timed: base forward passes per input (from each predictor's ``Cost``),
which does not move when the machine is busy; the table also gives the measured milliseconds per input.
Predictors that are told each input's task (the oracle, one parameter-efficient ensemble per task) are
drawn apart and kept off the Pareto front: the others must find the task themselves.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from adapterfuse.harness import uncertainty_table
from adapterfuse.io.atomic import write_text
from adapterfuse.recipe.detector import detector_paragraph
from adapterfuse.recipe.plots import marker_offsets, plot_cost, plot_heatmap, plot_reliability
from adapterfuse.recipe.schema import PlotMetric
from adapterfuse.tasks.glue import get_task

LOWER_IS_BETTER = frozenset({"nll", "ece", "brier"})
REFERENCES = ("base zero-shot", "oracle")


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


def metric_value(result: dict[str, Any], metric: PlotMetric) -> float | None:
    """A result's value of a metric the cost plot can show: the average score, or the mean over the tasks
    that have the metric (ECE: the classification tasks); ``None`` when no task has it."""
    if metric == "score":
        return result["average"]
    values = [t[metric] for t in result["tasks"].values() if t.get(metric) is not None]
    return statistics.fmean(values) if values else None


def cost_front(results: list[dict[str, Any]], metric: PlotMetric = "score") -> list[int]:
    """The Pareto front of a metric (the average score by default; NLL, ECE and Brier: lower is better)
    against base forward passes per input, among the results whose predictor needs no task id and that
    have the metric; indices into ``results``, cheapest first."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    eligible = [i for i, r in enumerate(results) if not needs_task_id(r) and metric_value(r, metric) is not None]
    points = [(results[i]["cost"]["forward_passes"], sign * metric_value(results[i], metric)) for i in eligible]
    return [eligible[j] for j in pareto_front(points)]


def cost_plot_data(results: list[dict[str, Any]], metric: PlotMetric = "score") -> list[dict[str, Any]]:
    """What the metric-vs-cost figure draws: one point per result that has the metric, numbered for the
    side table.

    Args:
        results: the run's results.
        metric: what the y axis shows (see :func:`metric_value`).

    Returns:
        Per result, in order: ``number`` (1-based), ``predictor``, ``passes`` (base forward passes per
        input), ``score`` (the metric's value), ``group`` (``backend``, ``task_id`` or ``reference``),
        ``on_front`` (the Pareto front among predictors that need no task id), and ``x`` (``log2``
        passes, moved right where markers of one cost would overlap).
    """
    results = [r for r in results if metric_value(r, metric) is not None]
    front = set(cost_front(results, metric))
    xs = [math.log2(max(r["cost"]["forward_passes"], 1e-3)) for r in results]
    ys = [metric_value(r, metric) for r in results]
    offsets = marker_offsets(xs, ys)
    points = []
    for i, r in enumerate(results):
        group = "task_id" if needs_task_id(r) else "reference" if r["predictor"] in REFERENCES else "backend"
        points.append(
            {
                "number": i + 1,
                "predictor": r["predictor"],
                "passes": r["cost"]["forward_passes"],
                "score": ys[i],
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


GUARD_NOTE = (
    " A guarded predictor hands the inputs the feature detector flags to its fallback (the base, or the "
    "uniform merge of every expert); the last two columns give the shares handed over."
)


def held_out_table(results: list[dict[str, Any]]) -> str:
    """One row per predictor scored on held-out tasks: each one's score and the out-of-task AUROC."""
    scored = [r for r in results if "out_of_task_auroc" in r]
    tasks = list(dict.fromkeys(t for r in scored for t in r.get("held_out", {})))
    members = any("out_of_task_auroc_mi" in r for r in scored)
    head = ["predictor", *[f"{t} ({'/'.join(get_task(t).metrics)})" for t in tasks], "out-of-task AUROC"]
    head += ["out-of-task AUROC, disagreement"] if members else []
    guarded = any("handed_over" in r for r in scored)
    head += ["handed over: in-task", "handed over: held-out"] if guarded else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in scored:
        held = r.get("held_out", {})
        cells = [r["predictor"]] + [f"{held[t]['score']:.3f}" if t in held else "—" for t in tasks]
        cells.append(f"{r['out_of_task_auroc']:.3f}")
        if members:
            cells.append(f"{r['out_of_task_auroc_mi']:.3f}" if "out_of_task_auroc_mi" in r else "—")
        if guarded:
            cells += [f"{r[k]:.1%}" if k in r else "—" for k in ("handed_over", "held_out_handed_over")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(summary: dict[str, Any], out: Path, plots: bool = True, metric: PlotMetric = "score") -> list[str]:
    """Write ``results.md`` and, with ``plots``, the figures of :mod:`adapterfuse.recipe.plots`.

    Args:
        summary: what :func:`~adapterfuse.recipe.runner.run_recipe` measured.
        out: the run folder.
        plots: draw the figures (needs matplotlib).
        metric: the y axis of the cost plot (``accuracy_vs_cost.png`` for the score, else
            ``<metric>_vs_cost.png``).

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
            "by their members' disagreement (mutual information, on the same scale)."
            + (GUARD_NOTE if any("handed_over" in r for r in results) else "")
            + "\n\n"
            + held_out_table(results)
            + "\n"
        )
    if summary.get("detector"):
        text += detector_paragraph(summary["detector"])
    write_text(out / "results.md", text)
    files = ["results.md"]
    if plots and results:
        stem = "accuracy" if metric == "score" else metric
        worse = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        label = "average dev score" if metric == "score" else f"mean {metric.upper()} over tasks{worse}"
        column = "score" if metric == "score" else metric.upper()
        title = f"{name}: {stem} vs cost"
        plot_cost(cost_plot_data(results, metric), out / f"{stem}_vs_cost.png", title, label, column)
        names = [r["predictor"] + (" (task id)" if needs_task_id(r) else "") for r in results]
        plot_heatmap(results, names, _tasks(results), out / "scores_heatmap.png", f"{name}: dev score per task")
        files += [f"{stem}_vs_cost.png", "scores_heatmap.png"]
        if plot_reliability(results, out / "reliability.png", f"{name}: reliability (top class, equal-mass bins)"):
            files.append("reliability.png")
    return files
