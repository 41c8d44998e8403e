"""train_pe_ensemble end to end: folders that load again, seeds, the predictor, and clear errors."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.errors import CompatibilityError, ConfigError, ExpertError, OutputExistsError
from adapterfuse.harness import evaluate
from adapterfuse.head import predict_proba
from adapterfuse.predictor import Predictor
from adapterfuse.train.pe.options import KINDS, PESpec
from adapterfuse.train.pe.predictor import PEEnsemble, load_pe_ensemble
from adapterfuse.train.pe.train import train_pe_ensemble
from tests.helpers import tiny_config, tiny_data

WEIGHTS = "weights.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("pe-train") / "glue")


def train(base, tmp_path, data, kind: str, name: str = "ens", members: int = 3, **kwargs):
    config = kwargs.pop("config", tiny_config())
    spec = PESpec(kind, members, config, kwargs)
    return train_pe_ensemble(base, "sst2", spec, out=tmp_path / name, data=data, progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip_gives_identical_probabilities(tiny_base, tmp_path, data, kind):
    ens = train(tiny_base, tmp_path, data, kind)
    assert (tmp_path / "ens" / WEIGHTS).is_file() and ens.path == tmp_path / "ens"
    before = ens.predictor(tiny_base, autocast=False)
    after = load_pe_ensemble(tmp_path / "ens", tiny_base, autocast=False)
    assert isinstance(after, Predictor)
    p1, p2 = before.predict_proba(data.task, data.test), after.predict_proba(data.task, data.test)
    assert torch.equal(p1, p2) and p1.shape == (len(data.test), 2)
    torch.testing.assert_close(p1.sum(dim=1), torch.ones(len(data.test)))
    result = evaluate(after, [data])
    assert result["cost"]["forward_passes"] == 3 and result["cost"]["stored_params"] == ens.stored_params
    after.save(tmp_path / "again")
    assert (tmp_path / "again" / WEIGHTS).read_bytes() == (tmp_path / "ens" / WEIGHTS).read_bytes()
    assert set(ens.manifest["scores"]) == {"validation", "test"}


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes(tiny_base, tmp_path, data):
    a = train(tiny_base, tmp_path, data, "batchensemble", "a", config=tiny_config(dropout=0.1))
    train(tiny_base, tmp_path, data, "batchensemble", "b", config=tiny_config(dropout=0.1))
    c = train(tiny_base, tmp_path, data, "batchensemble", "c", config=tiny_config(dropout=0.1, seed=1))
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_batchensemble_stores_little_more_than_one_lora(tiny_base, tmp_path, data):
    ens = train(tiny_base, tmp_path, data, "batchensemble", members=4)
    layout = ens.manifest["layout"]
    lora = sum(t.numel() for n, t in ens.tensors.items() if n.endswith((".A", ".B")))
    rank1 = sum(t.numel() for n, t in ens.tensors.items() if n.endswith((".r", ".s")))
    assert rank1 == lora  # K·(in + out) for the members against r·(in + out) for the LoRA: K = r = 4 here
    assert ens.manifest["training"]["trained_params"] == lora + rank1 and set(layout.values()) == {"batchensemble"}
    members = ens.member_deltas()
    assert len(members) == 4 and not torch.equal(members[0][next(iter(layout))].A, members[1][next(iter(layout))].A)


@pytest.mark.slow
def test_split_data_and_camero_perturbation_change_training(tiny_base, tmp_path, data):
    every = train(tiny_base, tmp_path, data, "batchensemble", "all")
    split = train(tiny_base, tmp_path, data, "batchensemble", "split", be_data="split")
    assert any(not torch.equal(every.tensors[k], split.tensors[k]) for k in every.tensors)
    quiet = train(tiny_base, tmp_path, data, "camero", "quiet", camero_perturbation="none")
    noisy = train(tiny_base, tmp_path, data, "camero", "noisy", camero_perturbation="noise")
    assert any(not torch.equal(quiet.tensors[k], noisy.tensors[k]) for k in quiet.tensors)


def test_merged_adapter_loads_in_plain_peft_and_base_is_untouched(tiny_base, tmp_path, data):
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    ens = train(tiny_base, tmp_path, data, "camero", config=tiny_config(autocast=True))
    assert all(torch.equal(before[k], v) for k, v in tiny_base.model.state_dict().items())
    merged = ens.merged()
    merged.save(tmp_path / "merged")
    from tests.helpers import plain_peft_model

    plain = plain_peft_model(tiny_base.model, tmp_path / "merged")
    probs = predict_proba(plain, tiny_base.tokenizer, data.task, data.test, autocast=False)
    ours = predict_proba(merged.attach(tiny_base.model), tiny_base.tokenizer, data.task, data.test, autocast=False)
    torch.testing.assert_close(probs, ours, rtol=0, atol=1e-6)


def test_bad_inputs_are_clear_errors(tiny_base, other_base, tmp_path, data):
    with pytest.raises(ConfigError, match="members: expected an integer >= 1, got 0"):
        train(tiny_base, tmp_path, data, "batchensemble", members=0)
    with pytest.raises(ConfigError, match="unknown; expected one of batchensemble, mimo, camero, swag"):
        train(tiny_base, tmp_path, data, "deep")
    with pytest.raises(ConfigError, match=r"\['swag_rank'\]: belong to another kind"):
        train(tiny_base, tmp_path, data, "batchensemble", swag_rank=2)
    with pytest.raises(ConfigError, match="be_data"):
        train(tiny_base, tmp_path, data, "batchensemble", be_data="some")
    with pytest.raises(ConfigError, match="colour"):
        train(tiny_base, tmp_path, data, "mimo", colour=1)
    with pytest.raises(ConfigError, match="expected method='lora'"):
        train(tiny_base, tmp_path, data, "swag", config=tiny_config(method="adalora", adalora_init_r=6))
    with pytest.raises(ConfigError, match="batch_size 4 < members 5"):
        train(tiny_base, tmp_path, data, "batchensemble", members=5, be_data="split")
    assert not (tmp_path / "ens").exists()  # nothing was written by a refused call
    train(tiny_base, tmp_path, data, "mimo", members=2)
    with pytest.raises(OutputExistsError):
        train(tiny_base, tmp_path, data, "mimo", members=2)
    with pytest.raises(CompatibilityError, match="same base model"):
        load_pe_ensemble(tmp_path / "ens", other_base)
    with pytest.raises(ExpertError, match=r"no manifest\.json"):
        PEEnsemble.load(tmp_path)
