"""Distilling an ensemble into one LoRA adapter."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.errors import ConfigError, OutputExistsError
from adapterfuse.expert import Expert
from adapterfuse.head import Scoring, predict_proba
from adapterfuse.tasks.glue import load_task
from adapterfuse.train.distill import distill
from tests.helpers import plain_peft_model, random_expert, tiny_config, write_glue_dir


@pytest.fixture(scope="module")
def teacher(tiny_base, tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("ens-distill") / "glue", n_train=40)
    data = [load_task(t, validation_size=8, max_train=24, glue_dir=root) for t in ("sst2", "stsb")]
    experts = [random_expert(tiny_base, f"m{i}", rank=4, seed=20 + i, scale=3.0) for i in range(2)]
    return EnsemblePredictor(tiny_base, experts, "log_linear", [0.7, 0.5], scoring=Scoring(autocast=False)), data


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum(-1).mean())


def test_the_student_moves_towards_the_ensemble_and_reports_what_it_kept(tiny_base, teacher, tmp_path):
    ensemble, data = teacher
    config = tiny_config(max_train_examples=None, epochs=4, lr=2e-2, batch_size=4, max_eval_examples=8)
    losses = []
    student = distill(ensemble, data, tmp_path / "student", config, callback=lambda s, loss: losses.append(loss))
    assert len(losses) == 2 * 4 * 24 // 4 and sum(losses[-6:]) < sum(losses[:6])
    report = student.meta["distillation"]
    assert set(report["test_average"]) == {"student", "ensemble", "base"} and "kept" in report
    assert report["teacher"]["members"] == ["m0", "m1"] and student.meta["tasks"] == ["sst2", "stsb"]
    loaded = Expert.load(tmp_path / "student")
    assert loaded.peft_type == "LORA" and loaded.base_fingerprint == tiny_base.fingerprint
    model = plain_peft_model(tiny_base.model, tmp_path / "student")  # plain PEFT loads it
    for td in data:
        target = ensemble.predict_proba(td.task, td.train)
        ours = predict_proba(model, tiny_base.tokenizer, td.task, td.train, autocast=False)
        before = predict_proba(tiny_base.model, tiny_base.tokenizer, td.task, td.train, autocast=False)
        assert kl(target, ours) < 0.5 * kl(target, before)  # much closer to the teacher than the base was


def test_bad_inputs_fail_before_any_work(teacher, tmp_path):
    ensemble, data = teacher
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        distill(ensemble, data, tmp_path / "exists", tiny_config())
    with pytest.raises(ConfigError, match="expected 'lora'"):
        distill(ensemble, data, tmp_path / "x", tiny_config(method="adalora", adalora_init_r=6))
    with pytest.raises(ConfigError, match="at least one task"):
        distill(ensemble, [], tmp_path / "x", tiny_config())
