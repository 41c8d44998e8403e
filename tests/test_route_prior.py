"""The ``task_prior`` target (its loss, its cross-validated weight), the PCA projection, and their checks."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.ensemble.cache import MemberCache
from adapterfuse.backends.options import validate_options
from adapterfuse.backends.route.api import route
from adapterfuse.backends.route.config import RouteConfig
from adapterfuse.backends.route.crossval import PRIOR_GRID, choose_prior_weight, stratified_folds
from adapterfuse.backends.route.data import PoolScores, example_quality
from adapterfuse.backends.route.features import SHAPE_DIM
from adapterfuse.backends.route.predictor import RoutePredictor
from adapterfuse.backends.route.routers.base import Projection
from adapterfuse.backends.route.routers.learned import FitOptions, LearnedRouter, routing_loss
from adapterfuse.errors import ConfigError
from adapterfuse.tasks.glue import get_task, load_task
from tests.helpers import random_expert, write_glue_dir


def _pool(good: int, n: int = 60) -> tuple[torch.Tensor, PoolScores]:
    """SST-2 rows whose own expert is 0; expert ``good`` puts 0.95 on the gold label, the other 0.05."""
    task = get_task("sst2")
    labels = [float(i % 2) for i in range(n)]
    gold = torch.tensor([int(v) for v in labels])
    right = torch.full((n, 2), 0.05).scatter(1, gold[:, None], 0.95).log()
    log_probs = torch.stack([right, right.flip(1)] if good == 0 else [right.flip(1), right])
    features = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    cache = MemberCache(task, log_probs, labels)
    return features, PoolScores(
        ["e0", "e1"], [cache], example_quality(task, log_probs, labels), torch.zeros(n, dtype=torch.long)
    )


def test_prior_adds_weighted_cross_entropy_towards_the_own_expert():
    gen = torch.Generator().manual_seed(0)
    logits, quality = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen).clamp(max=0)
    own = torch.tensor([0, 1, 2, -1, 0, 1, 2, 0])
    plain = routing_loss(logits, quality)
    assert torch.equal(routing_loss(logits, quality, own, 0.0), plain)
    ce = torch.nn.functional.cross_entropy(logits[own >= 0], own[own >= 0])
    torch.testing.assert_close(routing_loss(logits, quality, own, 2.5), plain + 2.5 * ce)


@pytest.mark.slow
def test_a_strong_prior_keeps_the_own_expert_where_the_likelihood_prefers_another():
    features, scores = _pool(good=1)
    free = LearnedRouter.fit(features, scores.quality, 2, FitOptions(target="task_prior", prior_weight=0.0), scores.own)
    held = LearnedRouter.fit(
        features, scores.quality, 2, FitOptions(target="task_prior", prior_weight=10.0), scores.own
    )
    assert bool((free.probs(features).argmax(1) == 1).all())
    assert bool((held.probs(features).argmax(1) == 0).all())


def test_folds_spread_each_task_evenly_and_repeat_for_a_seed():
    tasks = ["a"] * 11 + ["b"] * 7
    fold = stratified_folds(tasks, 3, seed=4)
    for name, n in (("a", 11), ("b", 7)):
        counts = torch.bincount(fold[torch.tensor([t == name for t in tasks])], minlength=3)
        assert int(counts.sum()) == n and int(counts.max() - counts.min()) <= 1
    assert torch.equal(fold, stratified_folds(tasks, 3, seed=4))
    assert not torch.equal(fold, stratified_folds(tasks, 3, seed=5))
    with pytest.raises(ConfigError, match="cv_folds: task b has 7 validation inputs, fewer than the 8 folds"):
        stratified_folds(tasks, 8, seed=0)


def test_cross_validation_leaves_the_own_expert_only_when_that_scores_better_out_of_fold():
    features, scores = _pool(good=1)
    weight, report = choose_prior_weight(features, scores, ["sst2"] * 60, k=3)
    assert [r["prior_weight"] for r in report["grid"]] == list(PRIOR_GRID)
    by_weight = {r["prior_weight"]: r["score"] for r in report["grid"]}
    assert report["chosen"] == weight < max(PRIOR_GRID) and by_weight[weight] == 1.0 > report["oracle_score"]
    # Among the weights that tie for best, the largest (closest to the oracle) wins.
    assert weight == max(w for w, s in by_weight.items() if s == 1.0) and by_weight[max(PRIOR_GRID)] < 1.0
    # Where the own expert is the best answer, every weight routes the same: the tie goes to the largest prior.
    features, scores = _pool(good=0)
    weight, report = choose_prior_weight(features, scores, ["sst2"] * 60, k=3)
    assert weight == max(PRIOR_GRID)
    assert {r["score"] for r in report["grid"]} == {1.0} and report["oracle_score"] == 1.0


@pytest.mark.parametrize(
    ("prior_weight", "cv_folds", "pca", "match"),
    [
        (-0.5, 5, None, "prior_weight: expected a number >= 0"),
        (float("inf"), 5, None, "prior_weight: expected a finite"),
        (None, 1, None, "cv_folds: expected an integer >= 2, got 1"),
        (None, 2.0, None, "cv_folds"),
        (None, 5, 0, "pca: expected an integer >= 1"),
        (None, 5, True, "pca"),
    ],
)
def test_bad_fit_options_are_refused(prior_weight, cv_folds, pca, match):
    with pytest.raises(ConfigError, match=match):
        validate_options(RouteConfig, {"prior_weight": prior_weight, "cv_folds": cv_folds, "pca": pca}, "route")


@pytest.mark.slow
def test_route_with_task_prior_is_deterministic_and_reports_its_choice(tiny_base, tmp_path):
    root = write_glue_dir(tmp_path / "glue", n_train=60, n_dev=8)
    data = [load_task(t, validation_size=20, glue_dir=root) for t in ("sst2", "rte")]
    experts = [
        random_expert(tiny_base, f"p{i}", rank=2, seed=i, scale=2.0, task=t) for i, t in enumerate(("sst2", "rte"))
    ]
    first = route(
        experts, tiny_base, router="learned", validation=data, target="task_prior", cv_folds=4, autocast=False
    )
    again = route(
        experts, tiny_base, router="learned", validation=data, target="task_prior", cv_folds=4, autocast=False
    )
    cv = first.info["prior_cv"]
    assert cv["folds"] == 4 and first.info["prior_weight"] == cv["chosen"] in PRIOR_GRID
    assert cv == again.info["prior_cv"]
    assert all(
        torch.equal(a, b) for a, b in zip(first.router.tensors().values(), again.router.tensors().values(), strict=True)
    )
    fixed = route(
        experts, tiny_base, router="learned", validation=data, target="task_prior", prior_weight=1.0, autocast=False
    )
    assert "prior_cv" not in fixed.info and fixed.info["prior_weight"] == 1.0
    with pytest.raises(ConfigError, match="prior_weight"):  # refused before any expert folder is read
        route(
            [tmp_path / "missing"], tiny_base, router="learned", validation=data, target="task_prior", prior_weight=-1.0
        )


def test_projection_keeps_top_components_and_passes_the_shape_through():
    gen = torch.Generator().manual_seed(0)
    signal = torch.randn(200, 1, generator=gen)
    content = signal @ torch.randn(1, 30, generator=gen) + 0.01 * torch.randn(200, 30, generator=gen)
    shape = torch.randn(200, 4, generator=gen)
    features = torch.cat([content, shape], dim=1)
    proj = Projection.fit(features, 3, keep=4)
    out = proj(features)
    assert out.shape == (200, 7) and proj.dim == 7
    torch.testing.assert_close(proj.components.T @ proj.components, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 3:], proj.scaler(features)[:, 30:])  # the shape, only standardised
    assert abs(torch.corrcoef(torch.stack([out[:, 0], signal[:, 0]]))[0, 1]) > 0.99  # the dominant direction first
    again = Projection.fit(features, 3, keep=4)
    assert torch.equal(again.components, proj.components)
    with pytest.raises(ConfigError, match=r"pca: expected an integer in 1 \.\. 30"):
        Projection.fit(features, 31, keep=4)


def test_a_projected_router_saves_and_loads_to_the_same_probabilities():
    gen = torch.Generator().manual_seed(2)
    features, labels = torch.randn(90, 12, generator=gen), torch.arange(90) % 3
    router = LearnedRouter.fit(features, labels, 3, FitOptions(target="task", pca=4, pca_keep=2))
    config = router.config()
    assert config["pca"] == 4 and config["pca_keep"] == 2 and config["dim"] == 6
    loaded = LearnedRouter.from_saved(config, router.tensors())
    assert torch.equal(loaded.probs(features), router.probs(features))
    plain = LearnedRouter.fit(features, labels, 3, FitOptions(target="task"))
    assert "pca" not in plain.config() and not any(k.startswith("proj.") for k in plain.tensors())


def test_route_on_fields_with_pca_projects_the_content_and_keeps_the_shape(tiny_base, tmp_path):
    root = write_glue_dir(tmp_path / "glue", n_train=60, n_dev=8)
    data = [load_task(t, validation_size=20, glue_dir=root) for t in ("sst2", "rte")]
    experts = [
        random_expert(tiny_base, f"q{i}", rank=2, seed=i, scale=2.0, task=t) for i, t in enumerate(("sst2", "rte"))
    ]
    predictor = route(
        experts, tiny_base, router="learned", validation=data, on="fields", pca=3, target="task", autocast=False
    )
    assert predictor.router.projection.keep == SHAPE_DIM and predictor.router.config()["dim"] == 3 + SHAPE_DIM
    predictor.save(tmp_path / "routed")
    loaded = RoutePredictor.load(tmp_path / "routed", tiny_base)
    batch = data[1].test
    assert torch.equal(loaded.predict_proba(data[1].task, batch), predictor.predict_proba(data[1].task, batch))
