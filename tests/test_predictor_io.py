"""Every predictor kind saves to a folder with one manifest, and load_predictor gives it back exactly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from adapterfuse import load_predictor
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.merge.adapter import MergedPredictor
from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.load import load_merged_adapter
from adapterfuse.backends.route.api import route
from adapterfuse.backends.route.routers.utility import UtilityRouter
from adapterfuse.base import load_base
from adapterfuse.errors import CompatibilityError, ExpertError
from adapterfuse.expert import Expert
from adapterfuse.harness import ExpertPredictor, OraclePredictor, ZeroShotPredictor
from adapterfuse.head import predict_proba
from adapterfuse.io.manifest import MANIFEST
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import Predictor
from adapterfuse.tasks.glue import load_task
from adapterfuse.train.distill import distill
from adapterfuse.train.expert import train_expert
from adapterfuse.train.pe.options import KINDS, PESpec
from adapterfuse.train.pe.train import train_pe_ensemble
from tests.conftest import write_glue_dir
from tests.helpers import plain_peft_model, random_expert, tiny_config

TASKS = ("sst2", "rte", "stsb")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("predictor-io") / "glue", n_train=40, n_dev=6)
    return [load_task(t, validation_size=16, max_train=16, glue_dir=root) for t in TASKS]


@pytest.fixture(scope="module")
def experts(tiny_base):
    return [random_expert(tiny_base, f"x{i}", rank=2 + i, seed=i, scale=2.0, task=t) for i, t in enumerate(TASKS)]


def listed_files(folder: Path) -> dict[str, str]:
    """The manifest's files -> sha256, after checking they are exactly the folder's other files."""
    manifest = json.loads((folder / MANIFEST).read_text())
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(listed) == on_disk
    for path, sha in listed.items():
        assert hashlib.sha256((folder / path).read_bytes()).hexdigest() == sha
    return listed


def round_trip(predictor: Predictor, folder: Path, base, data, kind: str) -> Predictor:
    """Save, check the manifest, load with load_predictor, and compare the probabilities bit for bit."""
    predictor.save(folder)
    assert json.loads((folder / MANIFEST).read_text())["kind"] == kind
    files = listed_files(folder)
    assert bool(files) == (kind != "zero_shot")  # the base alone has no files of its own
    loaded = load_predictor(folder, base)
    assert type(loaded) is type(predictor) and loaded.name == predictor.name
    assert loaded.cost() == predictor.cost()
    for td in data:
        assert torch.equal(loaded.predict_proba(td.task, td.test), predictor.predict_proba(td.task, td.test))
    return loaded


def test_zero_shot_oracle_and_expert(tiny_base, experts, data, tmp_path):
    round_trip(ZeroShotPredictor(tiny_base, autocast=False), tmp_path / "zs", tiny_base, data, "zero_shot")
    oracle = OraclePredictor(tiny_base, ExpertLibrary(experts), autocast=False)
    round_trip(oracle, tmp_path / "oracle", tiny_base, data, "oracle")
    loaded = round_trip(
        ExpertPredictor(tiny_base, experts[1], name="one", autocast=False),
        tmp_path / "expert",
        tiny_base,
        data,
        "expert",
    )
    assert loaded.autocast is False and loaded.batch_size == 32
    assert Expert.load(tmp_path / "expert").meta["task"] == "rte"  # still an expert folder


def test_a_full_merged_model_loads_without_a_base(tiny_base, experts, data, tmp_path):
    merged = merge(experts[:2], method="task_arithmetic", lam=0.5)
    merged.save_pretrained(tmp_path / "full", full=True, base=tiny_base, scoring={"autocast": False})
    assert json.loads((tmp_path / "full" / MANIFEST).read_text())["settings"]["full"] is True
    assert "model.safetensors" in listed_files(tmp_path / "full")
    loaded = load_predictor(tmp_path / "full")
    assert loaded.cost().stored_params == merged.num_params and loaded.name == "merge:task_arithmetic"
    for td in data:  # base weights + ΔW folded: equal up to rounding
        torch.testing.assert_close(
            loaded.predict_proba(td.task, td.test),
            merged.predictor(tiny_base, autocast=False).predict_proba(td.task, td.test),
            rtol=0,
            atol=1e-5,
        )
    with pytest.raises(ExpertError, match="holds a full merged model, not an adapter"):
        load_merged_adapter(tmp_path / "full")


def test_a_trained_expert_folder_loads_as_a_predictor(tiny_base, data, tmp_path):
    config = tiny_config(max_train_examples=16, max_eval_examples=4)
    expert = train_expert(tiny_base, "sst2", config, out=tmp_path / "trained", data=data[0], progress=False)
    files = listed_files(tmp_path / "trained")
    assert {"adapter_model.safetensors", "adapter_config.json", "adapterfuse.json"} <= set(files)
    loaded = load_predictor(tmp_path / "trained", tiny_base)
    assert isinstance(loaded, ExpertPredictor) and loaded.name == "trained"
    want = ExpertPredictor(tiny_base, expert).predict_proba(data[0].task, data[0].test)
    assert torch.equal(loaded.predict_proba(data[0].task, data[0].test), want)


@pytest.mark.parametrize("method", ["ties", "greedy_soup"])
def test_merged_adapters_stay_plain_peft_folders(tiny_base, experts, data, tmp_path, method):
    if method == "ties":
        merged = merge(experts, method="ties", density=0.5)
    else:
        merged = merge(experts, method="greedy_soup", base=tiny_base, validation=data, autocast=False)
    predictor = merged.predictor(tiny_base, autocast=False)
    loaded = round_trip(predictor, tmp_path / "m", tiny_base, data, "merged")
    assert isinstance(loaded, MergedPredictor) and loaded.adapter.method == method
    assert loaded.adapter.sources == merged.sources and loaded.adapter.search == merged.search
    again = load_merged_adapter(tmp_path / "m")
    assert again.result.params == merged.result.params and again.coverage == merged.coverage
    assert all(
        torch.equal(again.deltas[m].B, d.B) and torch.equal(again.deltas[m].A, d.A) for m, d in merged.deltas.items()
    )
    peft = plain_peft_model(tiny_base.model, tmp_path / "m")  # plain PEFT reads the same folder
    td = data[0]
    torch.testing.assert_close(
        predict_proba(peft, tiny_base.tokenizer, td.task, td.test, autocast=False),
        predictor.predict_proba(td.task, td.test),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("pooling", ["linear", "log_linear"])
def test_ensembles(tiny_base, experts, data, tmp_path, pooling):
    if pooling == "linear":
        fitted = ensemble(experts, tiny_base, pooling="linear", weights=[0.2, 0.3, 0.5], autocast=False)
    else:
        fitted = ensemble(experts, tiny_base, pooling="log_linear", weights="learned", validation=data, autocast=False)
    loaded = round_trip(fitted, tmp_path / "ens", tiny_base, data, "ensemble")
    assert loaded.weights == fitted.weights and loaded.info == fitted.info


ROUTES = {
    "learned": dict(router="learned", top_k=2, then="merge"),
    "clustered": dict(router="clustered", top_k=2, clusters=2),
    "mbc": dict(router="mbc", top_k=1, mbc_clusters=2),
    "utility": dict(router="learned", top_k=2, on="fields", target="task", decision="utility"),
}


@pytest.mark.parametrize("name", [*ROUTES, "arrow"])
def test_routed_predictors(tiny_base, experts, data, tmp_path, name):
    if name == "arrow":
        predictor = route(experts, tiny_base, router="arrow", top_k=2, autocast=False)
    else:
        predictor = route(experts, tiny_base, validation=data, autocast=False, **ROUTES[name])
    loaded = round_trip(predictor, tmp_path / "r", tiny_base, data, "arrow" if name == "arrow" else "route")
    if name == "utility":
        assert isinstance(loaded.router, UtilityRouter)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_efficient_ensembles(tiny_base, data, tmp_path, kind):
    ens = train_pe_ensemble(
        tiny_base,
        "sst2",
        PESpec(kind, 2, tiny_config(max_train_examples=16, max_eval_examples=4)),
        out=tmp_path / "pe",
        data=data[0],
        progress=False,
    )
    listed_files(tmp_path / "pe")  # the training run's own folder carries the manifest
    trained = load_predictor(tmp_path / "pe", tiny_base)
    assert torch.equal(
        trained.predict_proba(data[0].task, data[0].test),
        ens.predictor(tiny_base).predict_proba(data[0].task, data[0].test),
    )
    loaded = round_trip(
        ens.predictor(tiny_base, autocast=False, name="pe"), tmp_path / "again", tiny_base, data[:1], "pe_ensemble"
    )
    assert loaded.autocast is False


def test_a_distilled_adapter_is_an_expert(tiny_base, experts, data, tmp_path):
    teacher = ensemble(experts[:2], tiny_base, pooling="log_linear", autocast=False)
    config = tiny_config(max_train_examples=8, max_eval_examples=4, batch_size=4)
    student = distill(teacher, data[:1], tmp_path / "student", config)
    assert json.loads((tmp_path / "student" / MANIFEST).read_text())["kind"] == "expert"
    listed_files(tmp_path / "student")
    loaded = load_predictor(tmp_path / "student", tiny_base)
    td = data[0]
    assert torch.equal(
        loaded.predict_proba(td.task, td.test), ExpertPredictor(tiny_base, student).predict_proba(td.task, td.test)
    )


def test_a_tampered_file_is_refused_by_name_unless_verify_is_off(tiny_base, experts, data, tmp_path):
    folder = tmp_path / "ens"
    ensemble(experts[:2], tiny_base, pooling="linear", autocast=False).save(folder)
    weights = folder / "x1" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last tensor's data
    weights.write_bytes(bytes(raw))
    with pytest.raises(
        ExpertError,
        match=r"x1/adapter_model\.safetensors has sha256 [0-9a-f]{64}, expected "
        r"[0-9a-f]{64} .*verify=False",
    ):
        load_predictor(folder, tiny_base)
    assert load_predictor(folder, tiny_base, verify=False).names == ["x0", "x1"]
    weights.unlink()
    with pytest.raises(ExpertError, match=r"x1/adapter_model\.safetensors is missing"):
        load_predictor(folder, tiny_base, verify=False)


def test_manifest_errors_are_one_line(tiny_base, experts, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ExpertError, match=r"predictor folder .*: (no manifest\.json; expected|not found)") as e:
            load_predictor(folder, tiny_base)
        assert "\n" not in str(e.value)
    folder = tmp_path / "zs"
    ZeroShotPredictor(tiny_base).save(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    cases = [
        ({**manifest, "format_version": 2}, "format_version 2, this adapterfuse .* reads up to 1; upgrade"),
        ({**manifest, "kind": "bagging"}, "kind 'bagging' in manifest.json is unknown; expected one of"),
        ({**manifest, "colour": "red"}, "field 'colour': Extra inputs are not permitted"),
    ]
    for bad, message in cases:
        (folder / MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(ExpertError, match=message):
            load_predictor(folder, tiny_base)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CompatibilityError, match="saved for base 'tiny-llama-0'"):
        load_predictor(
            folder, tiny_base.__class__(**{**tiny_base.__dict__, "fingerprint": "weights-sha256:" + "f" * 64})
        )


def test_folders_in_the_older_formats_still_load(tiny_base, experts, data, tmp_path):
    fitted = ensemble(experts, tiny_base, pooling="linear", weights=[0.2, 0.3, 0.5], autocast=False)
    fitted.save(tmp_path / "ens")
    manifest = json.loads((tmp_path / "ens" / MANIFEST).read_text())
    old = {
        "kind": "ensemble",
        "format_version": 1,
        "name": manifest["name"],
        "base": manifest["base"],
        **manifest["settings"],
    }
    (tmp_path / "ens" / "ensemble.json").write_text(json.dumps(old))
    (tmp_path / "ens" / MANIFEST).unlink()
    loaded = load_predictor(tmp_path / "ens", tiny_base)
    td = data[2]
    assert torch.equal(loaded.predict_proba(td.task, td.test), fitted.predict_proba(td.task, td.test))
    (tmp_path / "zs").mkdir()
    (tmp_path / "zs" / "predictor.json").write_text(json.dumps({"kind": "zero_shot", "name": "base zero-shot"}))
    assert isinstance(load_predictor(tmp_path / "zs", tiny_base), ZeroShotPredictor)
    shutil.copytree(tmp_path / "ens" / "x0", tmp_path / "plain")
    for name in (MANIFEST, "adapterfuse.json"):  # a plain PEFT folder: an expert
        (tmp_path / "plain" / name).unlink()
    assert isinstance(load_predictor(tmp_path / "plain", tiny_base), ExpertPredictor)


def test_without_a_base_the_recorded_one_is_loaded(tiny_base, data, tmp_path):
    tiny_base.model.save_pretrained(tmp_path / "base")
    tiny_base.tokenizer.save_pretrained(tmp_path / "base")
    base = load_base(str(tmp_path / "base"))
    ZeroShotPredictor(base, autocast=False).save(tmp_path / "zs")
    loaded = load_predictor(tmp_path / "zs")
    td = data[0]
    assert torch.equal(
        loaded.predict_proba(td.task, td.test), ZeroShotPredictor(base, autocast=False).predict_proba(td.task, td.test)
    )
