"""Learned weights: lower validation loss than uniform, negative weights for an anti-correlated member."""

from __future__ import annotations

import random

import pytest
import torch

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.ensemble.cache import MemberCache
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.ensemble.weights import learn_weights, parse_weights, resolve_weights
from adapterfuse.errors import ConfigError
from adapterfuse.head import iter_batches, predict_proba
from adapterfuse.tasks.glue import get_task
from adapterfuse.tasks.spec import Example, TaskData
from adapterfuse.train.expert import train_expert
from tests.helpers import tiny_config

POS, NEG = "great good wonderful fine".split(), "bad terrible awful dull".split()
FILL = "the a movie film was plot story".split()


def sentiment(n: int, seed: int, flip: bool = False) -> list[Example]:
    """Sentences whose one sentiment word decides the label: learnable by the tiny model in a second."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = rng.randrange(2)
        words = [rng.choice(FILL) for _ in range(4)]
        words.insert(rng.randrange(5), rng.choice(POS if y else NEG))
        out.append(Example((" ".join(words).capitalize() + " .",), 1 - y if flip else y, i))
    return out


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """An expert, and one trained on flipped labels (anti-correlated with the truth), 20 epochs each; on some
    CPUs the first stays near chance while the second learns its flipped labels."""
    task, root = get_task("sst2"), tmp_path_factory.mktemp("ens-weights")
    config = tiny_config(max_train_examples=None, epochs=20, lr=1e-2, batch_size=4, max_eval_examples=4)
    validation = sentiment(32, seed=2)
    experts = []
    for name, flip in (("good", False), ("flipped", True)):
        data = TaskData(task, sentiment(64, seed=1, flip=flip), [], sentiment(4, seed=3))
        experts.append(train_expert(tiny_base, task, config, out=root / name, data=data, progress=False))
    return experts, TaskData(task, [], validation, sentiment(16, seed=3))


def nll(probs: torch.Tensor, labels) -> float:
    return float(-probs[torch.arange(len(labels)), torch.tensor(labels)].log().mean())


def accuracy(probs: torch.Tensor, labels) -> float:
    return float((probs.argmax(-1) == torch.tensor(labels)).float().mean())


@pytest.mark.parametrize("pooling", ["linear", "log_linear"])
def test_learned_weights_lower_the_validation_nll_below_uniform(tiny_base, trained, pooling):
    experts, data = trained
    labels = [e.label for e in data.validation]
    learned = ensemble(experts, tiny_base, pooling=pooling, weights="learned", validation=[data], autocast=False)
    uniform = ensemble(experts, tiny_base, pooling=pooling, weights="uniform", autocast=False)
    ours, flat = (nll(p.predict_proba(data.task, data.validation), labels) for p in (learned, uniform))
    assert ours < flat - 0.01
    report = learned.info["learned"]
    assert report["validation_nll_learned"] == pytest.approx(ours, abs=1e-4)
    assert report["validation_nll_uniform"] == pytest.approx(flat, abs=1e-4)


def test_log_linear_learns_a_negative_weight_for_the_anti_correlated_expert(tiny_base, trained):
    experts, data = trained
    labels = [e.label for e in data.validation]
    flipped_alone = predict_proba(
        experts[1].attach(tiny_base.model), tiny_base.tokenizer, data.task, data.validation, autocast=False
    )
    assert accuracy(flipped_alone, labels) < 0.4  # it really is anti-correlated with the truth
    predictor = ensemble(experts, tiny_base, pooling="log_linear", weights="learned", validation=[data], autocast=False)
    good, flipped = predictor.weights
    # On some CPUs the good member barely learns in this budget (about chance), so the fit rests on the
    # negated flipped member and the good one's sign is noise: what must hold is the negative weight, and
    # an ensemble at least as accurate as the better of the two used the right way round.
    assert flipped < 0 and good > flipped
    good_alone = predict_proba(
        experts[0].attach(tiny_base.model), tiny_base.tokenizer, data.task, data.validation, autocast=False
    )
    best_member = max(accuracy(good_alone, labels), 1 - accuracy(flipped_alone, labels))
    assert accuracy(predictor.predict_proba(data.task, data.validation), labels) >= best_member - 2 / len(labels)
    assert sum(abs(w) for w in predictor.weights) == pytest.approx(1.0) and predictor.temperature > 0
    assert predictor.info["learned"]["weights"] == {"good": good, "flipped": flipped}


def test_linear_weights_stay_on_the_simplex_and_favour_the_good_expert(tiny_base, trained):
    experts, data = trained
    predictor = ensemble(experts, tiny_base, pooling="linear", weights="learned", validation=[data], autocast=False)
    good, flipped = predictor.weights
    assert min(good, flipped) >= 0 and good + flipped == pytest.approx(1.0) and good > 0.7
    assert predictor.temperature == 1.0


def test_fit_runs_the_model_once_per_validation_batch_and_is_seeded(tiny_base, trained, monkeypatch):
    experts, data = trained
    calls = []
    original = BatchedEnsemble.member_logits
    monkeypatch.setattr(BatchedEnsemble, "member_logits", lambda self, *a: calls.append(1) or original(self, *a))
    first = ensemble(
        experts, tiny_base, pooling="log_linear", weights="learned", validation=[data], autocast=False, batch_size=8
    )
    batches = len(list(iter_batches(data.task, data.validation, tiny_base.tokenizer, 8)))
    assert len(calls) == batches  # cached once; the optimiser never runs the model
    second = ensemble(
        experts, tiny_base, pooling="log_linear", weights="learned", validation=[data], autocast=False, batch_size=8
    )
    assert first.weights == second.weights and first.temperature == second.temperature


def synthetic_caches(seed: int = 0) -> list[MemberCache]:
    """Member 0 informative, member 1 noise, member 2 anti-correlated; plus a regression task."""
    gen = torch.Generator().manual_seed(seed)
    n = 200
    labels = torch.randint(0, 2, (n,), generator=gen)
    signal = torch.nn.functional.one_hot(labels, 2).float() * 2 - 1
    good = signal + torch.randn(n, 2, generator=gen)
    members = torch.stack([good, torch.randn(n, 2, generator=gen), -signal + torch.randn(n, 2, generator=gen)])
    cls = MemberCache(get_task("sst2"), torch.log_softmax(members, -1), labels.tolist())
    scores = torch.rand(n, generator=gen) * 5
    centred = -(torch.arange(6.0)[None] - scores[:, None]).abs()
    reg = torch.stack(
        [
            2 * centred + torch.randn(n, 6, generator=gen),
            torch.randn(n, 6, generator=gen),
            -centred + torch.randn(n, 6, generator=gen),
        ]
    )
    return [cls, MemberCache(get_task("stsb"), torch.log_softmax(reg, -1), scores.tolist())]


@pytest.mark.parametrize("pooling", ["linear", "log_linear"])
def test_learning_on_cached_outputs_including_a_regression_task(pooling):
    fit = learn_weights(pooling, synthetic_caches(), ["good", "noise", "anti"], seed=3)
    assert fit.how == "learned"
    assert fit.report["validation_nll_learned"] < fit.report["validation_nll_uniform"] - 0.05
    assert fit.weights[0] == max(fit.weights)
    if pooling == "log_linear":
        assert fit.weights[2] < 0


def test_weight_specs_and_errors():
    assert parse_weights("uniform") == "uniform" and parse_weights(" Learned ") == "learned"
    assert parse_weights("0.5,0.25,0.25") == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_weights("heavy")
    with pytest.raises(ConfigError, match="validation data"):
        resolve_weights("learned", "linear", ["a", "b"])
    with pytest.raises(ConfigError, match="got 2 weights for 3 members"):
        resolve_weights([0.5, 0.5], "linear", ["a", "b", "c"])
    with pytest.raises(ConfigError, match="outputs of 3 members, expected 2"):
        learn_weights("linear", synthetic_caches(), ["a", "b"])
