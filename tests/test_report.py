"""The report a recipe run ends with: predictors told the task drawn apart, markers that never cover each other."""

from __future__ import annotations

import itertools

import pytest

from adapterfuse.recipe.plots import _AXES_H, _AXES_W, _MARKER, _limits
from adapterfuse.recipe.report import cost_plot_data, markdown_table, write_report


def _result(name: str, average: float, passes: float, needs_task_id: bool = False) -> dict:
    return {
        "predictor": name,
        "average": average,
        "tasks": {"sst2": {"score": average}, "rte": {"score": average}},
        "examples_per_s": 50.0,
        "cost": {"forward_passes": passes, "stored_params": 1000, "memory_bytes": 4000},
        "fit_seconds": 1.0,
        "needs_task_id": needs_task_id,
    }


RESULTS = [
    _result("base zero-shot", 0.30, 1),
    _result("oracle", 0.80, 1),  # the oracle needs the task id whatever its record says
    _result("merge uniform", 0.55, 1),
    _result("merge ties", 0.552, 1),  # the same cost and almost the same score as the uniform merge
    _result("merge learned", 0.553, 1),
    _result("ensemble of 2", 0.60, 2),
    _result("route learned top-1", 0.70, 1.03),
    _result("be", 0.90, 2, needs_task_id=True),  # one parameter-efficient ensemble per task
]


def test_predictors_told_the_task_are_drawn_apart_and_kept_off_the_front():
    points = {p["predictor"]: p for p in cost_plot_data(RESULTS)}
    assert {n for n, p in points.items() if p["group"] == "task_id"} == {"oracle", "be"}
    assert points["base zero-shot"]["group"] == "reference"
    assert {p["group"] for n, p in points.items() if n.startswith(("merge", "ensemble", "route"))} == {"backend"}
    # the oracle and "be" beat everything, yet the front is made of what needs no task id
    assert {n for n, p in points.items() if p["on_front"]} == {"merge learned", "route learned top-1"}
    assert [p["number"] for p in points.values()] == list(range(1, len(RESULTS) + 1))
    assert points["ensemble of 2"]["passes"] == 2  # cost is the counted passes, not the timed speed
    table = markdown_table(RESULTS)
    assert "| **route learned top-1** |" in table and "| oracle (task id) |" in table and "| be (task id) |" in table


def test_markers_of_one_cost_with_close_scores_are_moved_apart():
    points = cost_plot_data(RESULTS)
    xs = [p["x"] for p in points]
    (x0, x1), (y0, y1) = _limits(xs, [p["score"] for p in points])
    # in the figure's points: two markers overlap when closer than one marker on both axes
    for a, b in itertools.combinations(points, 2):
        dx = abs(a["x"] - b["x"]) / (x1 - x0) * _AXES_W
        dy = abs(a["score"] - b["score"]) / (y1 - y0) * _AXES_H
        assert dx >= _MARKER * 0.999 or dy >= _MARKER * 0.999, (a["predictor"], b["predictor"])
    merges = [p for p in points if p["predictor"].startswith("merge")]
    assert len({p["x"] for p in merges}) == 3  # same cost, near-equal scores: three columns side by side
    far = next(p for p in points if p["predictor"] == "base zero-shot")
    assert far["x"] == 0.0  # a point with room stays at its cost


def test_report_writes_the_table_and_both_plots(tmp_path):
    files = write_report({"recipe": "tiny", "results": RESULTS}, tmp_path)
    assert files == ["results.md", "accuracy_vs_cost.png", "scores_heatmap.png"]  # no reliability data: none
    for png in files[1:]:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not told the task" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def _calibrated(name: str, nll: float, passes: float, ece: float | None = None) -> dict:
    result = _result(name, 0.5, passes)
    result["tasks"] = {
        "sst2": {"score": 0.5, "nll": nll, "brier": 0.3},
        "stsb": {"score": 0.5, "nll": nll + 1, "brier": 0.4},
    }
    if ece is not None:
        result["tasks"]["sst2"]["ece"] = ece
        result["reliability"] = {"sst2": {"confidence": [0.6, 0.9], "accuracy": [0.5, 0.95], "count": [4, 4]}}
    return result


def test_the_cost_plot_shows_any_metric_and_each_predictor_gets_a_reliability_diagram(tmp_path):
    results = [_calibrated("a", 0.9, 1, 0.1), _calibrated("b", 0.5, 2, 0.2), _calibrated("c", 0.7, 4)]
    points = {p["predictor"]: p for p in cost_plot_data(results, "nll")}
    assert points["a"]["score"] == pytest.approx(1.4)  # the mean over the tasks that have it
    assert {n for n, p in points.items() if p["on_front"]} == {"a", "b"}  # lower is better: c is beaten by b
    assert [p["predictor"] for p in cost_plot_data(results, "ece")] == ["a", "b"]  # c has no classification ECE
    files = write_report({"recipe": "tiny", "results": results}, tmp_path, metric="nll")
    assert files == ["results.md", "nll_vs_cost.png", "scores_heatmap.png", "reliability.png"]
    for png in files[1:]:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))


def test_the_table_beside_the_cost_plot_heads_its_values_with_the_metric():
    from adapterfuse.recipe.plots import _pyplot, _side_table

    plt = _pyplot()
    fig, side = plt.subplots()
    points = [{"number": 1, "predictor": "a", "score": 1.4, "passes": 1}]
    _side_table(side, points, "NLL")
    text = side.texts[0].get_text()
    plt.close(fig)
    assert text.splitlines()[0].split()[-2:] == ["NLL", "passes"]
    assert text.splitlines()[1].split()[-2:] == ["1.400", "1"]
