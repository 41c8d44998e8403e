"""Bad adapter folders: each refused in one line naming the thing, or read correctly; nothing used silently."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfuse.errors import CompatibilityError, ExpertError
from adapterfuse.expert import Expert
from adapterfuse.head import Scoring
from adapterfuse.library import ExpertLibrary, load_library
from adapterfuse.surgery import linear_modules
from tests.helpers import random_expert

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture()
def folder(tiny_base, tmp_path):
    """A saved expert folder (rank 4 on q_proj and v_proj, with adapterfuse.json and manifest.json)."""
    expert = random_expert(
        tiny_base, "sst2", rank=4, modules=linear_modules(tiny_base.model, ("q_proj", "v_proj")), task="sst2"
    )
    return expert.save(tmp_path / "sst2")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is KeyError:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _plain(folder):
    """The folder as a plain PEFT adapter: no manifest, no adapterfuse.json."""
    (folder / "manifest.json").unlink()
    (folder / "adapterfuse.json").unlink(missing_ok=True)
    return folder


def test_both_weight_files_are_refused_naming_both(folder):
    state = load_file(str(folder / "adapter_model.safetensors"))
    torch.save(state, folder / "adapter_model.bin")
    for allow in (False, True):
        with pytest.raises(ExpertError, match=r"both adapter_model\.safetensors and adapter_model\.bin"):
            Expert.load(folder, allow_pickle=allow, verify=False)


@pytest.mark.parametrize(
    ("r", "match"),
    [
        (0, r"'r' is 0, expected a positive integer"),
        ("four", r"'r' is 'four', expected a positive integer"),
        (None, r"'r' is None, expected a positive integer"),
        (KeyError, r"has no 'r', expected a positive integer"),
        (True, r"'r' is True, expected a positive integer"),
    ],
)
def test_bad_rank_fields_are_one_line_errors(folder, r, match):
    _edit_json(_plain(folder) / "adapter_config.json", r=r)
    with pytest.raises(ExpertError, match=match):
        ExpertLibrary.load([folder])


@pytest.mark.parametrize(
    ("alpha", "match"),
    [
        (-8, r"'lora_alpha' is -8, expected a number >= 0"),
        ("8", r"'lora_alpha' is '8', expected a finite number"),
        (KeyError, r"has no 'lora_alpha'"),
    ],
)
def test_bad_alpha_fields_are_one_line_errors(folder, alpha, match):
    _edit_json(_plain(folder) / "adapter_config.json", lora_alpha=alpha)
    with pytest.raises(ExpertError, match=match):
        ExpertLibrary.load([folder])


def test_regex_key_in_rank_pattern_must_compile(folder):
    _edit_json(_plain(folder) / "adapter_config.json", rank_pattern={"q_proj(": 4})
    with pytest.raises(ExpertError, match=r"rank_pattern key 'q_proj\(' is not a regular expression"):
        ExpertLibrary.load([folder])


def test_tensors_for_a_module_not_in_target_modules_are_refused(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    _edit_json(_plain(folder) / "adapter_config.json", target_modules=[m for m in config["target_modules"] if m != Q0])
    with pytest.raises(ExpertError, match=rf"tensors for module '{Q0}', which target_modules .* does not cover"):
        ExpertLibrary.load([folder])


def test_tensors_missing_for_targeted_modules_are_refused_against_the_base(folder, tiny_base):
    state = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if Q0 not in k}, str(_plain(folder) / "adapter_model.safetensors"))
    with pytest.raises(ExpertError, match=rf"covers 1 module\(s\) of the base with no tensors .*'{Q0}'"):
        load_library([folder], tiny_base)


def test_rank_8_tensors_under_r_4_are_refused(tiny_base, tmp_path):
    folder = random_expert(tiny_base, "x", rank=8, modules=linear_modules(tiny_base.model, ("q_proj",))).save(
        tmp_path / "x"
    )
    _edit_json(_plain(folder) / "adapter_config.json", r=4, lora_alpha=4)
    with pytest.raises(ExpertError, match=r"lora_A has shape \[8, 32\], expected \[4, \*\] for the rank 4"):
        ExpertLibrary.load([folder])


def test_int64_lora_a_is_refused(folder):
    state = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in sorted(state) if "lora_A" in k)
    state[key] = state[key].round().to(torch.int64)
    save_file(state, str(_plain(folder) / "adapter_model.safetensors"))
    with pytest.raises(ExpertError, match=rf"{key}' has dtype torch.int64, expected a floating-point"):
        ExpertLibrary.load([folder])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("task", 5, r"field 'task' is 5, expected a task name"),
        ("base", None, r"field 'base' is None, expected an object"),
        ("base", {"spec": 3}, r"field 'base.spec' is 3, expected a string"),
    ],
)
def test_malformed_adapterfuse_json_is_a_one_line_error(folder, field, value, match):
    (folder / "manifest.json").unlink()
    _edit_json(folder / "adapterfuse.json", **{field: value})
    with pytest.raises(ExpertError, match=match):
        Expert.load(folder)


def test_plain_adapter_for_another_base_name_is_refused(folder, tiny_base):
    _edit_json(_plain(folder) / "adapter_config.json", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    ExpertLibrary.load([folder])  # without a base there is nothing to compare
    with pytest.raises(CompatibilityError, match=r"names base 'meta-llama/Llama-3.2-1B', the loaded base is 'tiny"):
        load_library([folder], tiny_base)
    _edit_json(folder / "adapter_config.json", base_model_name_or_path=f"/some/copy/of/{tiny_base.spec}")
    assert len(load_library([folder], tiny_base)) == 1  # a local copy of the same name is the same base


def test_merge_with_a_base_compares_the_recorded_base_name(folder, tiny_base, tmp_path):
    from adapterfuse import merge

    _edit_json(_plain(folder) / "adapter_config.json", base_model_name_or_path="other/base")
    with pytest.raises(CompatibilityError, match=r"names base 'other/base'"):
        merge([folder], method="uniform", base=tiny_base)


def test_expert_named_after_another_task_is_refused(folder, tmp_path):
    rte = shutil.copytree(folder, tmp_path / "rte")
    with pytest.raises(CompatibilityError, match=r"'rte': named after task 'rte', but .* records task 'sst2'"):
        ExpertLibrary.load([rte])


def test_changed_expert_file_is_refused_unless_verify_is_off(folder):
    state = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(state)[0]
    state[key] = state[key] * 2
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ExpertError, match=r"adapter_model\.safetensors has sha256 .* changed after saving"):
        Expert.load(folder)
    with pytest.raises(ExpertError, match="changed after saving"):
        ExpertLibrary.load([folder])
    loaded = ExpertLibrary.load([folder], verify=False)["sst2"]
    assert torch.equal(loaded.state_dict[key], state[key])


@pytest.fixture()
def two_experts(tiny_base):
    modules = linear_modules(tiny_base.model, ("q_proj", "v_proj"))
    return [random_expert(tiny_base, t, rank=2, modules=modules, seed=i, task=t) for i, t in enumerate(("sst2", "rte"))]


def _save_oracle(base, experts, path):
    from adapterfuse.harness import OraclePredictor

    OraclePredictor(base, ExpertLibrary(experts), autocast=False).save(path)
    return path


def test_oracle_member_recording_another_task_is_refused(tiny_base, two_experts, tmp_path):
    from adapterfuse import load_predictor

    folder = _save_oracle(tiny_base, two_experts, tmp_path / "oracle")
    _edit_json(folder / "rte" / "adapterfuse.json", task="sst2")
    with pytest.raises(ExpertError, match=r"rte/adapterfuse\.json has sha256"):
        load_predictor(folder, tiny_base)
    with pytest.raises(
        ExpertError, match=r"member 'rte' .* saved as the expert for task 'rte', but .* says task 'sst2'"
    ):
        load_predictor(folder, tiny_base, verify=False)


def test_ensemble_member_changed_in_an_unhashed_manifest_is_refused(tiny_base, two_experts, tmp_path):
    from adapterfuse import load_predictor
    from adapterfuse.backends.ensemble.predictor import EnsemblePredictor

    folder = tmp_path / "ens"
    EnsemblePredictor(tiny_base, two_experts, "log_linear", [0.5, 0.5], scoring=Scoring(autocast=False)).save(folder)
    _edit_json(folder / "manifest.json", files=[])  # as an older manifest: no file hashes, only member hashes
    for member in ("sst2", "rte"):
        (folder / member / "manifest.json").unlink()
    assert load_predictor(folder, tiny_base).name
    weights = next(folder.rglob("adapter_model.safetensors"))
    state = load_file(str(weights))
    save_file({k: v * 2 for k, v in state.items()}, str(weights))
    with pytest.raises(ExpertError, match=r"ensemble member .* tensors hash .* weights changed after saving"):
        load_predictor(folder, tiny_base)


def test_merge_command_verifies_expert_folders_unless_no_verify(two_experts, tmp_path):
    import argparse

    from adapterfuse.cli.merge import register, run

    folders = [e.save(tmp_path / e.name) for e in two_experts]
    state = load_file(str(folders[0] / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in state.items()}, str(folders[0] / "adapter_model.safetensors"))
    parser = argparse.ArgumentParser(prog="adapterfuse")
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["merge", "--experts", *map(str, folders), "--method", "uniform", "--out", str(tmp_path / "out")]
    with pytest.raises(ExpertError, match="changed after saving"):
        run(parser.parse_args(argv))
    assert not (tmp_path / "out").exists()
    assert run(parser.parse_args([*argv, "--no-verify"])) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_full_save_compares_the_recorded_base_name(folder, tiny_base, tmp_path):
    from adapterfuse import merge

    _edit_json(_plain(folder) / "adapter_config.json", base_model_name_or_path="other/base")
    merged = merge([folder], method="uniform")  # no base given: nothing to compare yet
    with pytest.raises(CompatibilityError, match=r"experts name base 'other/base', got base 'tiny"):
        merged.save_pretrained(tmp_path / "full", full=True, base=tiny_base)
    assert not (tmp_path / "full").exists()
