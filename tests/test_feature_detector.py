"""The feature-space out-of-task detector: its distance, its threshold, its folder and its command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapterfuse.cli import main
from adapterfuse.errors import CompatibilityError, ConfigError, ExpertError, OutputExistsError
from adapterfuse.feature_detector import (
    WEIGHTS_FILE,
    DetectorSpec,
    FeatureDetector,
    field_text,
    input_rows,
    knn_distance,
    leave_one_task_out,
    unit_rows,
)
from adapterfuse.tasks.glue import load_held_out, load_task
from tests.helpers import make_tiny_model


def test_knn_distance_is_the_cosine_distance_to_the_kth_neighbour():
    bank = unit_rows(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    x = torch.tensor([[2.0, 2.0], [0.0, -3.0]])
    r = 1 / math.sqrt(2)
    # x0 has cosine r with the first two rows and -r with the third; x1 has 0, -1, 0
    assert torch.allclose(knn_distance(x, bank, 1), torch.tensor([1 - r, 1.0]))
    assert torch.allclose(knn_distance(x, bank, 2), torch.tensor([1 - r, 1.0]))
    assert torch.allclose(knn_distance(x, bank, 3), torch.tensor([1 + r, 2.0]))


def test_knn_distance_in_chunks_equals_one_pass(monkeypatch):
    import adapterfuse.feature_detector as fd

    gen = torch.Generator().manual_seed(0)
    x, bank = torch.randn(7, 5, generator=gen), unit_rows(torch.randn(11, 5, generator=gen))
    whole = knn_distance(x, bank, 3)
    monkeypatch.setattr(fd, "SCORE_ROWS", 2)
    assert torch.equal(knn_distance(x, bank, 3), whole) and knn_distance(x[:0], bank, 3).shape == (0,)


def test_unit_rows_forget_the_length():
    rows = unit_rows(torch.tensor([[3.0, 4.0], [30.0, 40.0]]))
    assert torch.allclose(rows, torch.tensor([[0.6, 0.8], [0.6, 0.8]]))


def test_each_field_has_its_own_slot_and_an_absent_one_is_zeros(tiny_base, glue_dir):
    assert [field_text(("a  b", "c"), s) for s in (0, 1)] == ["a b", "c"]
    assert [field_text(("a",), s) for s in (0, 1)] == ["a", ""]
    assert field_text(("a", "b", "c"), 1) == "b\nc"
    detector = FeatureDetector.fit(tiny_base, [load_task("sst2", 0, max_train=4)], DetectorSpec(layer=1))
    sst2 = load_task("sst2", 0, max_train=4)
    rows = input_rows(detector.extractor, sst2.task, sst2.train, "each_field")
    half = detector.extractor.dim
    assert rows.shape == (4, 2 * half) and detector.dim == 2 * half
    assert torch.allclose(rows.norm(dim=1), torch.ones(4)) and rows[:, half:].abs().max() == 0
    whole = input_rows(detector.extractor, sst2.task, sst2.train, "fields")  # one field: the same direction
    assert torch.allclose(rows[:, :half], whole, atol=1e-6)


@pytest.fixture()
def tasks(glue_dir):
    return [load_task(name, validation_size=20, max_train=30) for name in ("sst2", "rte")]


def test_training_inputs_lie_at_distance_zero_and_the_threshold_keeps_the_accepted_share(tiny_base, tasks):
    detector = FeatureDetector.fit(tiny_base, tasks, DetectorSpec(layer=1), accept=0.75)
    own = torch.cat([detector.score(td.task, td.train) for td in tasks])
    assert own.abs().max() < 1e-5
    validation = torch.cat([detector.score(td.task, td.validation) for td in tasks])
    assert (validation > 0).all()  # carved out of train: never in the bank
    kept = 1 - float(torch.cat([detector.flags(td.task, td.validation) for td in tasks]).float().mean())
    assert 0.75 <= kept <= 0.75 + 1 / len(validation)
    farther = FeatureDetector.fit(tiny_base, tasks, DetectorSpec(layer=1, k=3))
    assert (farther.score(tasks[0].task, tasks[0].test) >= detector.score(tasks[0].task, tasks[0].test)).all()


def test_the_prompt_tells_tasks_apart_and_the_fields_read_the_input(tiny_base, tasks, glue_dir):
    """An input scored under another task's template is far from the bank with ``on="prompt"``; with the
    raw fields the template is not read, so the same input scores the same under either task."""
    sst2, cola = tasks[0], load_task("cola", 0, max_train=1)
    sentences = sst2.test[:8]
    for on in ("fields", "each_field"):
        fields = FeatureDetector.fit(tiny_base, [sst2], DetectorSpec(layer=1, on=on))
        assert torch.equal(fields.score(sst2.task, sentences), fields.score(cola.task, sentences))
    prompt = FeatureDetector.fit(tiny_base, [sst2], DetectorSpec(layer=1, on="prompt"))
    assert (prompt.score(cola.task, sentences) > prompt.score(sst2.task, sentences)).all()


def test_save_and_load_score_alike_and_refuse_altered_or_foreign_folders(tiny_base, other_base, tasks, tmp_path):
    detector = FeatureDetector.fit(tiny_base, tasks, DetectorSpec(layer=2, readout="mean_last", k=2))
    detector.save(tmp_path / "det")
    loaded = FeatureDetector.load(tmp_path / "det", tiny_base)
    assert loaded.settings() == detector.settings() and loaded.spec.layer == 2
    assert torch.equal(loaded.score(tasks[1].task, tasks[1].test), detector.score(tasks[1].task, tasks[1].test))
    with pytest.raises(OutputExistsError):
        detector.save(tmp_path / "det")
    with pytest.raises(CompatibilityError, match="fitted on base tiny-llama-0"):
        FeatureDetector.load(tmp_path / "det", other_base)
    config = tmp_path / "det" / "detector.json"
    kept = config.read_text()
    config.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k != "tasks"}))
    with pytest.raises(ExpertError, match=r"detector.json lacks \['tasks'\]; the file is incomplete"):
        FeatureDetector.load(tmp_path / "det", tiny_base)
    config.write_text(kept)
    weights = tmp_path / "det" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ExpertError, match="missing or altered"):
        FeatureDetector.load(tmp_path / "det", tiny_base)


def test_leave_one_task_out_scores_each_task_against_the_others(tiny_base, tasks):
    detector = FeatureDetector.fit(tiny_base, tasks, DetectorSpec(layer=1))
    found = leave_one_task_out(detector, tasks)
    assert list(found) == ["sst2", "rte"] and all(0.0 <= v <= 1.0 for v in found.values())
    with pytest.raises(ConfigError, match="expected at least 2 in-task tasks, got 1"):
        leave_one_task_out(detector, tasks[:1])


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda base, tasks: DetectorSpec(k=0), "k: expected a neighbour rank >= 1, got 0"),
        (lambda base, tasks: DetectorSpec(on="text"), "on: expected one of each_field, fields, prompt, got 'text'"),
        (lambda base, tasks: DetectorSpec(readout="max"), "readout: expected one of mean, mean_last, got 'max'"),
        (lambda base, tasks: FeatureDetector.fit(base, tasks, accept=0.0), "accept: expected a share in"),
        (lambda base, tasks: FeatureDetector.fit(base, [], DetectorSpec(layer=1)), "at least one in-task task"),
        (lambda base, tasks: FeatureDetector.fit(base, tasks, DetectorSpec(layer=9)), "layer 9: out of range"),
        (lambda base, tasks: FeatureDetector.fit(base, tasks, DetectorSpec(k=61)), "at least k=61 rows"),
    ],
)
def test_bad_settings_fail_with_one_line(tiny_base, tasks, make, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make(tiny_base, tasks)


def test_no_threshold_without_validation_inputs(tiny_base, glue_dir):
    held = load_held_out("mrpc")  # dev only: no validation split
    detector = FeatureDetector.fit(tiny_base, [load_task("sst2", 0, max_train=10)], DetectorSpec(layer=1))
    assert detector.threshold is None
    with pytest.raises(ConfigError, match="no threshold"):
        detector.flags(held.task, held.test)


def test_detect_command_prints_the_table_and_saves_the_detector(tokenizer, tmp_path, glue_dir, capsys):
    folder = tmp_path / "tiny"
    make_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = ["detect", "--tasks", "sst2,cola", "--held-out", "rte", "--base", str(folder), "--layer", "1"]
    argv += ["--max-train", "30", "--validation-size", "10", "--out", str(tmp_path / "det"), "-q"]
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["in_task"]) == {"sst2", "cola"} and set(record["held_out"]) == {"rte"}
    assert 0.0 <= record["auroc"] <= 1.0 and record["held_out"]["rte"]["n"] == 20
    saved = json.loads((tmp_path / "det" / "results.json").read_text())
    assert saved["auroc"] == record["auroc"] and (tmp_path / "det" / WEIGHTS_FILE).is_file()
    assert main([*argv, "--overwrite", "--leave-one-out"]) == 0
    printed = capsys.readouterr().out
    assert "all held-out against all in-task inputs: AUROC" in printed
    assert "each in-task task left out in turn: AUROC sst2 " in printed
    assert main(argv) == 1 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--accept", "1.5"]) == 1 and "accept: expected a share in (0, 1]" in capsys.readouterr().err
    argv[argv.index("rte")] = "cola"
    assert main(argv) == 1 and "--held-out: ['cola'] also in --tasks" in capsys.readouterr().err
