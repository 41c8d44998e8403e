from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfuse.errors import CompatibilityError, ExpertError, OutputExistsError
from adapterfuse.expert import Expert
from adapterfuse.head import predict_proba
from adapterfuse.library import ExpertLibrary
from adapterfuse.tasks.glue import get_task
from adapterfuse.train.expert import train_expert
from tests.helpers import plain_peft_model, tiny_config, tiny_data


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("expert")
    config = tiny_config()
    data = tiny_data(root / "glue", config=config)
    expert = train_expert(tiny_base, "sst2", config, out=root / "sst2", data=data, progress=False)
    return expert, data


def test_expert_folder_loads_in_plain_peft_with_the_same_probabilities(trained, tiny_base):
    expert, data = trained
    task = get_task("sst2")
    plain = plain_peft_model(tiny_base.model, expert.path)
    ours = expert.attach(tiny_base.model)
    p_plain = predict_proba(plain, tiny_base.tokenizer, task, data.test, autocast=False)
    p_ours = predict_proba(ours, tiny_base.tokenizer, task, data.test, autocast=False)
    p_base = predict_proba(tiny_base.model, tiny_base.tokenizer, task, data.test, autocast=False)
    torch.testing.assert_close(p_plain, p_ours, rtol=0, atol=1e-6)
    assert (p_plain - p_base).abs().max() > 1e-4  # the adapter changed something


def test_metadata_and_card_are_written(trained, tiny_base):
    expert, _ = trained
    meta = json.loads((expert.path / "adapterfuse.json").read_text())
    assert meta["task"] == "sst2" and meta["method"] == "lora" and meta["seed"] == 0
    assert meta["base"]["fingerprint"] == tiny_base.fingerprint
    assert set(meta["scores"]) == {"validation", "test"} and "accuracy" in meta["scores"]["test"]
    assert meta["training"]["train_examples"] == 48 and meta["training"]["rank"] == 4
    assert {"torch", "peft", "transformers", "adapterfuse"} <= set(meta["versions"])
    card = (expert.path / "README.md").read_text()
    assert "sst2" in card and "PeftModel.from_pretrained" in card
    assert not list(expert.path.parent.glob(".sst2*"))  # no temp or partial folder left behind


def test_existing_output_is_refused_before_any_work(trained, tiny_base):
    expert, data = trained
    before = (expert.path / "adapter_model.safetensors").read_bytes()
    calls = []
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train_expert(
            tiny_base,
            "sst2",
            tiny_config(),
            out=expert.path,
            data=data,
            progress=False,
            callback=lambda step, loss: calls.append(step),
        )
    assert not calls and (expert.path / "adapter_model.safetensors").read_bytes() == before


def _copy(expert: Expert, tmp_path, name: str):
    """The expert's folder as a plain PEFT folder would arrive: its files, without our manifest of hashes."""
    target = tmp_path / name
    shutil.copytree(expert.path, target)
    (target / "manifest.json").unlink()
    return target


def test_corrupt_safetensors_is_a_clear_error(trained, tmp_path):
    folder = _copy(trained[0], tmp_path, "corrupt")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExpertError, match="not a readable safetensors file"):
        Expert.load(folder)


def test_pickled_only_adapter_is_refused_unless_allowed(trained, tmp_path):
    folder = _copy(trained[0], tmp_path, "pickled")
    state = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, folder / "adapter_model.bin")
    with pytest.raises(ExpertError, match="allow_pickle"):
        Expert.load(folder)
    loaded = Expert.load(folder, allow_pickle=True)
    assert all(torch.equal(loaded.state_dict[k], state[k]) for k in state)


def test_nan_weights_are_refused_by_the_library(trained, tmp_path):
    folder = _copy(trained[0], tmp_path, "nan")
    state = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ExpertError, match=rf"'nan'.*{key}.*non-finite"):
        ExpertLibrary.load([folder])


def test_experts_from_two_bases_are_refused(trained, other_base, tmp_path):
    expert, data = trained
    other = train_expert(other_base, "sst2", tiny_config(), out=tmp_path / "other", data=data, progress=False)
    with pytest.raises(CompatibilityError, match=r"'other'.*base fingerprint"):
        ExpertLibrary([expert, other])
    with pytest.raises(CompatibilityError, match="fingerprint"):
        ExpertLibrary([other], base_fingerprint=expert.base_fingerprint)


def test_plain_peft_folder_falls_back_to_name_and_shapes(trained, tmp_path):
    folder = _copy(trained[0], tmp_path, "plain")
    (folder / "adapterfuse.json").unlink()
    library = ExpertLibrary([trained[0], Expert.load(folder)])
    assert any("no base fingerprint" in n for n in library.notes)


def test_missing_folder_and_bad_json(tmp_path):
    with pytest.raises(ExpertError, match="not found"):
        Expert.load(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{oops")
    with pytest.raises(ExpertError, match="not valid JSON"):
        Expert.load(tmp_path / "bad")
