"""The one training loop: its loss plug-in, checkpoint and resume for every trainer, the scored dev subset."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.errors import ResumeError
from adapterfuse.head import Scoring, predictions
from adapterfuse.tasks.glue import load_task
from adapterfuse.tasks.metrics import compute_metrics
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.distill import distill
from adapterfuse.train.loop import Checkpoint, Objective, Trainable, linear_schedule, run_loop, scored_test
from adapterfuse.train.pe.options import KINDS, PESpec
from adapterfuse.train.pe.train import train_pe_ensemble
from tests.conftest import write_glue_dir
from tests.helpers import Interrupt, random_expert, stop_at, tiny_config, tiny_data

WEIGHTS = "weights.safetensors"


def _linear(seed: int = 0) -> tuple[torch.nn.Linear, Trainable]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    return model, Trainable(dict(model.named_parameters()), optimizer, linear_schedule(optimizer, 10, 2))


def _loop_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"checkpoint_every": 3, "grad_clip": 1.0, **overrides})


class _Regression(Objective):
    """A noisy least-squares loss that also keeps state (a running sum of losses) to checkpoint."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.total, self.seen = model, 0.0, []

    def loss(self, step: int, batch: float) -> torch.Tensor:
        self.seen.append(step)
        x = torch.randn(4, 3)  # from the global RNG: a resume must restore it
        return ((self.model(x).squeeze(1) - batch * x.sum(1)) ** 2).mean()

    def after_update(self, step: int) -> None:
        self.total += step

    def state(self) -> dict:
        return {"total": self.total}

    def load_state(self, payload: dict) -> None:
        self.total = payload["total"]


def test_the_loss_plug_in_drives_the_updates():
    schedule = [1.0] * 10
    model, trainable = _linear()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def zero_loss(step: int, batch: float) -> torch.Tensor:  # a plain callable is a plug-in too
        calls.append((step, batch))
        return 0.0 * model(torch.ones(1, 3)).sum()

    result = run_loop(schedule, trainable, zero_loss, _loop_config())
    assert calls == [(s, 1.0) for s in range(10)] and result.steps == 10 and result.resumed_from_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no gradient, no move
    model, trainable = _linear()
    objective = _Regression(model)
    run_loop(schedule, trainable, objective, _loop_config())
    assert objective.seen == list(range(10)) and objective.total == sum(range(10))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_run_loop_resumes_parameters_optimizer_rng_and_objective_state(tmp_path):
    schedule = [float(i % 3) for i in range(10)]
    model, trainable = _linear()
    straight = _Regression(model)
    run_loop(schedule, trainable, straight, _loop_config())
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    identity = {"run": "regression", "config": _loop_config().model_dump(mode="json")}
    model, trainable = _linear()
    with pytest.raises(Interrupt):
        run_loop(
            schedule, trainable, _Regression(model), _loop_config(), Checkpoint(tmp_path / "out", identity), stop_at(8)
        )
    torch.manual_seed(123)  # whatever ran since: the checkpoint's RNG state is what counts
    model, trainable = _linear()
    resumed = _Regression(model)
    result = run_loop(schedule, trainable, resumed, _loop_config(), Checkpoint(tmp_path / "out", identity))
    assert result.resumed_from_step == 6 and resumed.seen == [6, 7, 8, 9]
    assert resumed.total == straight.total
    assert all(torch.equal(expected[n], p) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    return tmp_path_factory.mktemp("loop") / "glue"


@pytest.fixture(scope="module")
def data(glue):
    return tiny_data(glue)


@pytest.mark.parametrize("kind", KINDS)
def test_pe_ensemble_resumes_to_the_same_bytes(tiny_base, tmp_path, data, kind):
    config = tiny_config(dropout=0.1)  # 12 steps, a checkpoint every 4; SWAG collects from step 7
    options = {"camero_perturbation": "noise"} if kind == "camero" else {}

    def train(name: str, **kwargs):
        spec = PESpec(kind, 3, config, options)
        return train_pe_ensemble(tiny_base, "sst2", spec, out=tmp_path / name, data=data, progress=False, **kwargs)

    straight = train("straight")
    with pytest.raises(Interrupt):
        train("resumed", callback=stop_at(10))
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial" / "checkpoint.pt").is_file()
    resumed = train("resumed")
    assert resumed.manifest["training"]["resumed_from_step"] == 8
    assert (tmp_path / "straight" / WEIGHTS).read_bytes() == (tmp_path / "resumed" / WEIGHTS).read_bytes()
    assert resumed.manifest["scores"] == straight.manifest["scores"]
    assert not (tmp_path / ".resumed.partial").exists()


def test_pe_ensemble_refuses_to_resume_another_run(tiny_base, tmp_path, data):
    with pytest.raises(Interrupt):
        train_pe_ensemble(
            tiny_base,
            "sst2",
            PESpec("batchensemble", 3, tiny_config()),
            out=tmp_path / "x",
            data=data,
            progress=False,
            callback=stop_at(5),
        )
    with pytest.raises(ResumeError, match=r"different config\.lr;") as err:
        train_pe_ensemble(
            tiny_base,
            "sst2",
            PESpec("batchensemble", 3, tiny_config(lr=1e-4)),
            out=tmp_path / "x",
            data=data,
            progress=False,
        )
    assert "\n" not in str(err.value)  # one line
    with pytest.raises(ResumeError, match=r"different members, options;"):
        train_pe_ensemble(
            tiny_base,
            "sst2",
            PESpec("batchensemble", 2, tiny_config(), {"be_jitter": 0.2}),
            out=tmp_path / "x",
            data=data,
            progress=False,
        )
    # overwrite discards the stale checkpoint and starts afresh
    ens = train_pe_ensemble(
        tiny_base,
        "sst2",
        PESpec("batchensemble", 2, tiny_config()),
        out=tmp_path / "x",
        data=data,
        progress=False,
        overwrite=True,
    )
    assert ens.manifest["training"]["resumed_from_step"] == 0


def test_pe_ensemble_scores_the_same_dev_subset_as_an_expert(tiny_base, tmp_path, glue, data):
    config = tiny_config(max_eval_examples=7, seed=3)
    subset = scored_test(data.test, config)
    assert len(data.test) > 7 and subset != data.test[:7]  # a seeded subset, not the first ones
    capped = load_task(
        "sst2", config.validation_size, config.seed, config.max_train_examples, max_test=7, glue_dir=glue
    )
    assert subset == capped.test  # what load_task(max_test=...) and the other commands score
    ens = train_pe_ensemble(tiny_base, "sst2", PESpec("mimo", 2, config), out=tmp_path / "m", data=data, progress=False)
    probs = ens.predictor(tiny_base, autocast=False).predict_proba(data.task, subset)
    expected = compute_metrics(data.task.metrics, predictions(data.task, probs), [e.label for e in subset])
    assert ens.manifest["scores"]["test"] == expected


@pytest.fixture(scope="module")
def teacher(tiny_base, tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("loop-distill") / "glue", n_train=40)
    tasks = [load_task(t, validation_size=8, max_train=16, glue_dir=root) for t in ("sst2", "stsb")]
    experts = [random_expert(tiny_base, f"m{i}", rank=4, seed=20 + i, scale=3.0) for i in range(2)]
    return EnsemblePredictor(tiny_base, experts, "log_linear", [0.7, 0.5], scoring=Scoring(autocast=False)), tasks


def test_distillation_resumes_to_the_same_bytes_and_refuses_another_run(teacher, tmp_path):
    ensemble, tasks = teacher
    config = tiny_config(max_train_examples=None, dropout=0.1, max_eval_examples=4)  # 2 tasks x 4 steps
    straight = distill(ensemble, tasks, tmp_path / "straight", config)
    with pytest.raises(Interrupt):
        distill(ensemble, tasks, tmp_path / "resumed", config, callback=stop_at(6))
    assert not (tmp_path / "resumed").exists()
    with pytest.raises(ResumeError, match=r"different config\.epochs;") as err:
        distill(
            ensemble,
            tasks,
            tmp_path / "resumed",
            tiny_config(max_train_examples=None, dropout=0.1, max_eval_examples=4, epochs=2.0),
        )
    assert "\n" not in str(err.value)  # one line
    other = EnsemblePredictor(ensemble.base, ensemble.experts, "linear", scoring=Scoring(autocast=False))
    with pytest.raises(ResumeError, match=r"different teacher;"):
        distill(other, tasks, tmp_path / "resumed", config)
    resumed = distill(ensemble, tasks, tmp_path / "resumed", config)
    assert resumed.meta["training"]["resumed_from_step"] == 4
    assert (tmp_path / "straight" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "resumed" / "adapter_model.safetensors"
    ).read_bytes()
    assert resumed.meta["distillation"]["test_average"] == straight.meta["distillation"]["test_average"]
    assert not (tmp_path / ".resumed.partial").exists()
