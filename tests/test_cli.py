from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterfuse.cli import main
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base") / "tiny"
    make_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "--task", "sst2"], "--out"),
        (["train", "--task", "sst2", "--out", "x", "--rank", "0"], "positive integer"),
        (["train", "--task", "sst2", "--out", "x", "--method", "dora"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_errors_exit_1_with_one_line_and_no_traceback(tmp_path, capsys, glue_dir):
    (tmp_path / "exists").mkdir()
    assert main(["train", "--task", "sst2", "--out", str(tmp_path / "exists")]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["train", "--task", "squad", "--out", str(tmp_path / "new")]) == 1
    assert "unknown" in capsys.readouterr().err


def test_train_then_eval_end_to_end(tiny_folder, tmp_path, capsys, glue_dir):
    out = tmp_path / "expert"
    code = main(
        [
            "train",
            "--task",
            "sst2",
            "--base",
            str(tiny_folder),
            "--out",
            str(out),
            "--max-train-examples",
            "16",
            "--max-eval-examples",
            "4",
            "--batch-size",
            "4",
            "--validation-size",
            "8",
            "--no-autocast",
            "--json",
        ]
    )
    assert code == 0 and (out / "adapterfuse.json").is_file()
    printed = json.loads(capsys.readouterr().out)
    assert printed["scores"]["test"]["accuracy"] >= 0
    assert (
        main(
            [
                "eval",
                "--experts",
                str(out),
                "--tasks",
                "sst2",
                "--base",
                str(tiny_folder),
                "--max-eval-examples",
                "6",
                "--validation-size",
                "8",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert "| oracle |" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tasks"]["sst2"]["n"] == 6 and result["predictor"] == "oracle"
    assert (
        main(
            [
                "eval",
                "--tasks",
                "sst2",
                "--base",
                str(tiny_folder),
                "--max-eval-examples",
                "6",
                "--validation-size",
                "8",
            ]
        )
        == 0
    )
    assert "| base zero-shot |" in capsys.readouterr().out


def test_eval_scores_an_adapter_without_a_task_on_every_task(tiny_folder, tmp_path, capsys, glue_dir):
    expert = tmp_path / "expert"
    small = ["--base", str(tiny_folder), "--validation-size", "8"]
    argv = ["train", "--task", "stsb", "--out", str(expert), "--max-train-examples", "16", "--batch-size", "4"]
    assert main([*argv, *small, "--max-eval-examples", "6"]) == 0
    recorded = json.loads((expert / "adapterfuse.json").read_text())["scores"]["test"]
    plain = tmp_path / "plain"  # the same adapter as a plain PEFT folder: no task recorded
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / name).write_bytes((expert / name).read_bytes())
    scored = ["--base", str(tiny_folder), "--validation-size", "8", "--max-eval-examples", "6", "--json"]
    capsys.readouterr()
    assert main(["eval", "--experts", str(expert), "--tasks", "stsb", *scored]) == 0
    oracle = json.loads(capsys.readouterr().out)
    assert oracle["tasks"]["stsb"]["pearson"] == pytest.approx(recorded["pearson"], abs=1e-3)  # same subset
    assert main(["eval", "--experts", str(plain), "--tasks", "stsb,rte", *scored]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["predictor"] == "plain" and set(alone["tasks"]) == {"stsb", "rte"}
    assert alone["tasks"]["stsb"]["score"] == oracle["tasks"]["stsb"]["score"]
    assert main(["eval", "--experts", str(expert), str(plain), "--tasks", "stsb", *scored]) == 1
    err = capsys.readouterr().err
    assert "'plain' records no task" in err and "alone" in err and len(err.strip().splitlines()) == 1


def test_train_a_parameter_efficient_ensemble(tiny_folder, tmp_path, capsys, glue_dir):
    out = tmp_path / "be"
    code = main(
        [
            "train",
            "--task",
            "sst2",
            "--base",
            str(tiny_folder),
            "--out",
            str(out),
            "--ensemble",
            "batchensemble",
            "--members",
            "3",
            "--max-train-examples",
            "16",
            "--max-eval-examples",
            "4",
            "--batch-size",
            "4",
            "--validation-size",
            "8",
            "--no-autocast",
            "--json",
        ]
    )
    assert code == 0 and json.loads((out / "manifest.json").read_text())["kind"] == "pe_ensemble"
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "batchensemble" and printed["members"] == 3 and "test" in printed["scores"]


@pytest.mark.parametrize(
    "command, hint",
    [
        (["train", "--task", "sst2", "--out", "x"], "resume from it"),
        (["run", "recipes/glue_quick.yaml", "--out", "x"], "resume where it stopped"),
        (["eval", "--tasks", "sst2"], "no output was written"),
    ],
)
def test_ctrl_c_exits_130_with_one_line(command, hint, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    command = [c if c != "x" else str(tmp_path / "out") for c in command]
    monkeypatch.setattr("adapterfuse.base.load_base", interrupted)
    monkeypatch.setattr("adapterfuse.recipe.runner.load_base", interrupted)
    assert main(command) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and hint in err
    if command[0] != "run":  # a run keeps its recipe.json; nothing else writes before the base loads
        assert not (tmp_path / "out").exists()


def test_python_dash_m_runs_the_same_command_line():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "adapterfuse.cli", "merge", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 0 and "usage: adapterfuse merge" in done.stdout
