"""Expected-score routing: the utility matrix, the choice it makes, and ``route(decision="utility")``."""

from __future__ import annotations

import math

import pytest
import torch

from adapterfuse.backends.ensemble.cache import MemberCache
from adapterfuse.backends.options import validate_options
from adapterfuse.backends.route.api import route
from adapterfuse.backends.route.config import RouteConfig
from adapterfuse.backends.route.data import PoolScores, example_quality
from adapterfuse.backends.route.predictor import RoutePredictor
from adapterfuse.backends.route.routers.base import keep_top_k
from adapterfuse.backends.route.routers.learned import LearnedRouter
from adapterfuse.backends.route.routers.utility import UtilityRouter, expected_scores, utility_matrix
from adapterfuse.errors import ConfigError
from adapterfuse.tasks.glue import get_task, load_task
from tests.helpers import random_expert, write_glue_dir


def _answers(labels: list[float], right: list[bool]) -> torch.Tensor:
    """``[n, 2]`` log-probabilities putting 0.9 on the gold label where ``right``, else on the other one."""
    gold = torch.tensor([int(v) for v in labels])
    said = torch.where(torch.tensor(right), gold, 1 - gold)
    return torch.full((len(labels), 2), 0.1).scatter(1, said[:, None], 0.9).log()


def _scores() -> PoolScores:
    """SST-2 (own expert 0) and RTE (own expert 1), 8 inputs each; expert 2 serves no task.

    Accuracy on SST-2: expert 0 all, expert 1 half, expert 2 none. On RTE: expert 0 none, 1 and 2 all.
    """
    labels = [float(i % 2) for i in range(8)]
    caches, quality, own = [], [], []
    for task, rights, expert in (
        ("sst2", ([True] * 8, [True, False] * 4, [False] * 8), 0),
        ("rte", ([False] * 8, [True] * 8, [True] * 8), 1),
    ):
        log_probs = torch.stack([_answers(labels, r) for r in rights])
        caches.append(MemberCache(get_task(task), log_probs, labels))
        quality.append(example_quality(get_task(task), log_probs, labels))
        own += [expert] * 8
    return PoolScores(["e0", "e1", "e2"], caches, torch.cat(quality), torch.tensor(own))


class _Given(LearnedRouter):
    """A router with given probabilities (what a fitted task-target router would output)."""

    def __init__(self, probs: torch.Tensor) -> None:
        self.given, self.n_experts = probs, probs.shape[1]

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.given


def test_the_utility_matrix_is_each_experts_score_on_the_task_of_each_own_expert():
    u = utility_matrix(_scores())
    assert u[:, :2].tolist() == [[1.0, 0.0], [0.5, 1.0], [0.0, 1.0]]
    assert all(math.isnan(v) for v in u[:, 2].tolist())  # expert 2 is no task's own expert


def test_rows_keeps_each_tasks_answers_labels_and_owners_for_the_kept_rows():
    scores = _scores()
    keep = torch.tensor([True, False] * 4 + [False] * 6 + [True] * 2)
    part = scores.rows(keep)
    assert [c.log_probs.shape[1] for c in part.caches] == [4, 2] and part.own.tolist() == [0] * 4 + [1] * 2
    assert torch.equal(part.caches[0].log_probs, scores.caches[0].log_probs[:, 0:8:2])
    assert part.caches[1].labels == scores.caches[1].labels[6:] and torch.equal(part.quality, scores.quality[keep])
    # Rows 0, 2, 4, 6 of SST-2 all have gold label 0, where expert 1 is right only on even rows: all of them.
    assert utility_matrix(part)[:, 0].tolist() == [1.0, 1.0, 0.0]


def test_the_choice_is_the_best_expected_score_not_the_likeliest_task():
    # Even-ish odds of SST-2 and RTE: expert 0 is likelier, but expert 1 answers both tasks well.
    u = torch.tensor([[0.8, 0.0, float("nan")], [0.6, 0.8, float("nan")], [0.0, 0.0, float("nan")]])
    posterior = torch.tensor([[0.55, 0.45, 0.0], [0.95, 0.05, 0.0], [0.3, 0.3, 0.4]])
    expected = expected_scores(posterior, u)
    torch.testing.assert_close(expected[0], torch.tensor([0.44, 0.69, 0.0]))
    # The third row's mass on expert 2 (no task) is left out: the rest is renormalised to even odds.
    torch.testing.assert_close(expected[2], torch.tensor([0.4, 0.7, 0.0]))
    router = UtilityRouter(_Given(posterior), u)
    indices, weights = router.choose(torch.zeros(3, 1), 1)
    assert indices[:, 0].tolist() == [1, 0, 1]
    assert keep_top_k(posterior, 1)[0][:, 0].tolist() == [0, 0, 2]  # what the most probable expert would be
    indices, weights = router.choose(torch.zeros(3, 1), 2)
    assert indices[0].tolist() == [1, 0]
    torch.testing.assert_close(weights[0], torch.tensor([0.45, 0.55]))  # weighted by the posterior
    assert torch.equal(router.probs(torch.zeros(3, 1)), posterior)
    with pytest.raises(ConfigError, match="top_k: 4 is larger than the number of experts"):
        router.choose(torch.zeros(3, 1), 4)
    with pytest.raises(ConfigError, match=r"utility: expected a \[3, 3\] matrix"):
        UtilityRouter(_Given(posterior), u[:2])


@pytest.mark.parametrize(
    ("decision", "router", "target", "match"),
    [
        ("greedy", "learned", "task", "decision 'greedy': unknown; expected one of probability, utility"),
        ("utility", "learned", "likelihood", "needs router='learned' with target='task'"),
        ("utility", "clustered", "task", "got router='clustered'"),
    ],
)
def test_bad_decisions_are_refused(decision, router, target, match):
    with pytest.raises(ConfigError, match=match):
        validate_options(RouteConfig, {"decision": decision, "router": router, "target": target}, "route")


def test_route_with_the_utility_decision_chooses_by_expected_score_and_saves(tiny_base, tmp_path):
    root = write_glue_dir(tmp_path / "glue", n_train=60, n_dev=8)
    data = [load_task(t, validation_size=20, glue_dir=root) for t in ("sst2", "rte", "stsb")]
    experts = [
        random_expert(tiny_base, f"u{i}", rank=2, seed=i, scale=2.0, task=t)
        for i, t in enumerate(("sst2", "rte", "stsb"))
    ]
    predictor = route(
        experts,
        tiny_base,
        router="learned",
        top_k=2,
        validation=data,
        on="fields",
        target="task",
        decision="utility",
        autocast=False,
    )
    router = predictor.router
    assert isinstance(router, UtilityRouter) and isinstance(router.inner, LearnedRouter)
    assert predictor.info["decision"] == "utility" and len(predictor.info["utility"]) == 3
    torch.testing.assert_close(torch.tensor(predictor.info["utility"]), router.utility, atol=1e-4, rtol=0)
    for td in data:
        features = predictor.extractor.features(td.task, td.test, "fields")
        want = torch.sort(
            expected_scores(router.inner.probs(features), router.utility), dim=1, descending=True, stable=True
        )[1][:, :2]
        assert torch.equal(predictor.choose(td.task, td.test)[0], want)
    predictor.save(tmp_path / "r")
    loaded = RoutePredictor.load(tmp_path / "r", tiny_base)
    assert isinstance(loaded.router, UtilityRouter) and torch.equal(loaded.router.utility, router.utility)
    for td in data:
        assert torch.equal(loaded.predict_proba(td.task, td.test), predictor.predict_proba(td.task, td.test))
    with pytest.raises(ConfigError, match="decision 'utility': needs"):  # refused before any folder is read
        route(
            [tmp_path / "missing"],
            tiny_base,
            router="learned",
            validation=data,
            target="best_expert",
            decision="utility",
        )
