"""merge(): each method against dense float64 references, identity, order, saving, and bad inputs.

The reference ΔW of an expert is read through PEFT itself (``merge_and_unload`` minus the base
weights), so nothing of adapterfuse's algebra is reused to check it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapterfuse.backends.merge.adapter import MergedAdapter
from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.config import MergeConfig
from adapterfuse.errors import CompatibilityError, ConfigError, ExpertError, OutputExistsError
from adapterfuse.expert import Expert
from adapterfuse.head import predict_proba
from adapterfuse.tasks.glue import get_task
from adapterfuse.train.expert import train_expert
from tests.helpers import plain_peft_model, tiny_config, tiny_data

TASK = get_task("sst2")


@pytest.fixture(scope="module")
def lib(tiny_base, tmp_path_factory):
    """Three experts on tiny_base: LoRA r4 (all linears), LoRA r2 on three modules, AdaLoRA init_r 6."""
    root = tmp_path_factory.mktemp("merge_api")
    data = tiny_data(root / "glue")
    configs = {
        "lora4": tiny_config(),
        "lora2": tiny_config(rank=2, seed=1, target_modules=("q_proj", "v_proj", "up_proj")),
        "ada": tiny_config(method="adalora", adalora_init_r=6, adalora_delta_t=1, seed=2),
    }
    experts = {
        name: train_expert(tiny_base, "sst2", cfg, out=root / name, data=data, progress=False)
        for name, cfg in configs.items()
    }
    return experts, data, root


def _peft_dense(expert: Expert, base_model) -> dict[str, torch.Tensor]:
    """Every linear's ΔW in float64 as PEFT applies it: merged weights minus base weights."""
    merged = plain_peft_model(base_model, expert.path).merge_and_unload()
    before, after = base_model.state_dict(), merged.state_dict()
    return {
        k.removesuffix(".weight"): after[k].double() - before[k].double() for k in before if k.endswith("proj.weight")
    }


@pytest.fixture(scope="module")
def dense(lib, tiny_base):
    experts, _, _ = lib
    return {name: _peft_dense(e, tiny_base.model) for name, e in experts.items()}


def _trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Top entries by magnitude via a full stable sort (ties: lowest flat index first)."""
    n = max(1, math.floor(density * x.numel()))
    keep = torch.argsort(x.abs().flatten(), descending=True, stable=True)[:n]
    out = torch.zeros(x.numel(), dtype=x.dtype)
    out[keep] = x.flatten()[keep]
    return out.view_as(x)


def _sign_mean(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The default convention: sign elected on the weighted values, agreeing ones divided by their |weights|."""
    ys = torch.stack([w * x for w, x in zip(weights, xs, strict=True)])
    sign = torch.where(ys.sum(0) >= 0, 1.0, -1.0).double()
    agree = (ys != 0) & (torch.sign(ys) == sign)
    denom = (torch.tensor(weights, dtype=torch.float64).abs().reshape(-1, 1, 1) * agree).sum(0)
    return torch.where(denom > 0, (ys * agree).sum(0) / torch.where(denom > 0, denom, 1.0), 0.0)


def _near_trim_threshold(x: torch.Tensor, density: float) -> torch.Tensor:
    """Entries whose magnitude is within float32 rounding of the trim threshold: fp32 and fp64 may order them
    differently, so which of them is kept is not a property of the method."""
    n = max(1, math.floor(density * x.numel()))
    threshold = torch.sort(x.abs().flatten(), descending=True).values[n - 1]
    return (x != 0) & ((x.abs() - threshold).abs() <= 1e-6 * float(x.abs().max()))


def _reference(method: str, xs: list[torch.Tensor], w: list[float], lam: float, density: float) -> torch.Tensor:
    if method == "uniform":
        return sum(wi * x for wi, x in zip(w, xs, strict=True)) / sum(w)
    if method in ("task_arithmetic", "dare_linear"):  # dare_* at density 1 drops nothing
        return lam * sum(wi * x for wi, x in zip(w, xs, strict=True))
    if method == "ties":
        return lam * _sign_mean([_trim(x, density) for x in xs], w)
    return lam * _sign_mean(xs, w)  # dare_ties at density 1


NAMES = ["lora4", "lora2", "ada"]
CASES = [
    ("uniform", dict(weights=[1.0, 2.0, 3.0])),
    ("task_arithmetic", dict(weights=[0.5, -1.0, 2.0], lam=0.7)),
    ("ties", dict(weights=[1.0, 0.5, 2.0], lam=0.8, density=0.3, rank=64)),
    ("dare_linear", dict(weights=[1.0, -0.5, 1.5], lam=1.2, density=1.0, rank=64)),
    ("dare_ties", dict(weights=[1.0, 0.5, 2.0], lam=0.9, density=1.0, rank=64)),
]


@pytest.mark.parametrize(("method", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_each_method_matches_a_dense_float64_reference(lib, dense, method, kwargs):
    experts, _, _ = lib
    merged = merge([experts[n] for n in NAMES], method=method, **kwargs)
    assert merged.method == method
    # Experts are merged in their canonical order; the recorded weights follow the recorded sources.
    recorded = dict(zip([s["name"] for s in merged.sources], merged.params["weights"], strict=True))
    assert recorded == dict(zip(NAMES, kwargs["weights"], strict=True))
    assert set(merged.deltas) == set(dense["lora4"])  # the union of modules
    for module, got in merged.deltas.items():
        xs = [dense[n][module] for n in NAMES]  # zero where an expert lacks the module
        ref = _reference(method, xs, kwargs["weights"], kwargs.get("lam", 1.0), kwargs.get("density", 1.0))
        error = (got.dense(torch.float64) - ref).abs()
        if method == "ties":  # a near-tie at the threshold may flip between fp32 and fp64; few such entries
            ambiguous = torch.stack([_near_trim_threshold(x, kwargs["density"]) for x in xs]).any(0)
            assert int(ambiguous.sum()) <= max(2, ref.numel() // 100), (module, int(ambiguous.sum()))
            error = torch.where(ambiguous, 0.0, error)
        diff = float(error.max())
        assert diff <= 1e-5 * float(ref.abs().max()) + 1e-9, (module, diff)


def test_dare_drops_and_rescales_entries(lib, dense):
    experts, _, _ = lib
    merged = merge([experts["lora4"]], method="dare_linear", density=0.5, lam=1.0, rank=64, seed=3)
    kept = total = 0
    for module, got in merged.deltas.items():
        ref, out = dense["lora4"][module], got.dense(torch.float64)
        dropped_err, kept_err = out.abs(), (out - 2.0 * ref).abs()  # kept entries are ΔW / density
        assert float(torch.minimum(dropped_err, kept_err).max()) <= 1e-5 * float(ref.abs().max())
        kept, total = kept + int((kept_err < dropped_err).sum()), total + out.numel()
    assert 0.45 < kept / total < 0.55


def test_ranks_add_up_for_lora_of_different_ranks_and_adalora(lib):
    experts, _, _ = lib
    merged = merge([experts[n] for n in NAMES], method="task_arithmetic", lam=1.0)
    ada_rank = {
        m.removeprefix("base_model.model.").removesuffix(".lora_E"): int((t != 0).sum())
        for m, t in experts["ada"].state_dict.items()
        if m.endswith("lora_E")
    }
    q = "model.layers.0.self_attn.q_proj"
    k = "model.layers.0.self_attn.k_proj"
    assert merged.deltas[q].rank == 4 + 2 + ada_rank[q]
    assert merged.deltas[k].rank == 4 + ada_rank[k]  # lora2 has no k_proj
    # the experts are merged in their canonical order (by weight hash), which differs with the CPU that trained them
    assert sorted(merged.coverage[k]) == ["ada", "lora4"] and merged.overall_error == 0.0


def _probs(model, base, data):
    return predict_proba(model, base.tokenizer, TASK, data.test, autocast=False)


@pytest.mark.parametrize("name", ["lora4", "ada"])
@pytest.mark.parametrize(("method", "kwargs"), [("uniform", {}), ("task_arithmetic", {"lam": 1.0})])
def test_one_expert_with_weight_one_is_that_expert(lib, tiny_base, name, method, kwargs):
    experts, data, _ = lib
    merged = merge([experts[name]], method=method, **kwargs)
    p_merged = merged.predictor(tiny_base, autocast=False).predict_proba(TASK, data.test)
    p_expert = _probs(experts[name].attach(tiny_base.model), tiny_base, data)
    gap = float((p_merged - p_expert).abs().max())
    assert gap <= 1e-5
    # The check can fail: the expert moves the base's outputs far more than the merge differs from it.
    assert float((p_expert - _probs(tiny_base.model, tiny_base, data)).abs().max()) > max(10 * gap, 1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_expert_order_does_not_change_the_result(lib, method):
    experts, _, _ = lib
    a = merge([experts[n] for n in NAMES], method=method, weights=[1.0, 0.5, 2.0], seed=1)
    b = merge([experts[n] for n in ("ada", "lora4", "lora2")], method=method, weights=[2.0, 1.0, 0.5], seed=1)
    for module in a.deltas:
        torch.testing.assert_close(a.deltas[module].dense(), b.deltas[module].dense(), rtol=1e-5, atol=1e-7)


def test_saved_folder_loads_in_plain_peft_with_the_same_probabilities(lib, tiny_base, tmp_path):
    experts, data, _ = lib
    merged = merge([experts[n] for n in NAMES], method="ties", density=0.5)
    folder = merged.save_pretrained(tmp_path / "merged")
    p_ours = merged.predictor(tiny_base, autocast=False).predict_proba(TASK, data.test)
    p_plain = _probs(plain_peft_model(tiny_base.model, folder), tiny_base, data)
    assert float((p_ours - p_plain).abs().max()) <= 1e-5
    meta = json.loads((folder / "adapterfuse.json").read_text())
    assert meta["method"] == "ties" and meta["params"]["density"] == 0.5 and meta["params"]["lambda"] == 1.0
    assert [s["sha256"] for s in meta["sources"]] == sorted(experts[n].weights_sha256() for n in NAMES)
    assert meta["base"]["fingerprint"] == tiny_base.fingerprint
    assert set(meta["truncation_error"]["per_module"]) == set(merged.deltas)
    assert meta["truncation_error"]["overall"] == pytest.approx(merged.overall_error) and merged.overall_error > 0
    card = (folder / "README.md").read_text()
    assert all(n in card for n in NAMES) and "ties" in card and "truncation error" in card
    assert merged.predictor(tiny_base).cost().stored_params == merged.num_params > 0


def test_full_model_has_the_same_probabilities(lib, tiny_base, tmp_path):
    experts, data, _ = lib
    merged = merge([experts["lora4"], experts["lora2"]], method="task_arithmetic", lam=0.5)
    folder = merged.save_pretrained(tmp_path / "full", full=True, base=tiny_base)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    p_full = _probs(model, tiny_base, data)
    p_ours = merged.predictor(tiny_base, autocast=False).predict_proba(TASK, data.test)
    assert float((p_full - p_ours).abs().max()) <= 1e-5
    assert json.loads((folder / "adapterfuse.json").read_text())["full_model"] is True


def test_lambda_is_searched_on_validation_or_one_without_it(lib, tiny_base):
    experts, data, _ = lib
    pair = [experts["lora4"], experts["lora2"]]
    searched = merge(pair, method="task_arithmetic", base=tiny_base, validation=[data], autocast=False)
    record = searched.search["lambda_search"]
    assert record["grid"] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5] and len(record["scores"]) == 6
    best = max(record["scores"])  # the choice itself is checked where scores differ (test_merge_learned)
    assert record["scores"][record["grid"].index(record["chosen"])] == best
    assert searched.params["lambda"] == record["chosen"]
    plain = merge(pair, method="task_arithmetic")
    assert plain.params["lambda"] == 1.0 and plain.search["lambda_search"] is None


def test_plain_peft_folder_is_accepted_with_a_note(lib, tmp_path):
    experts, _, _ = lib
    folder = tmp_path / "plain"
    shutil.copytree(experts["lora4"].path, folder)
    (folder / "adapterfuse.json").unlink()
    (folder / "manifest.json").unlink()  # a plain PEFT folder carries neither
    merged = merge([folder, experts["lora2"].path], method="uniform")
    assert any("no base fingerprint" in n for n in merged.notes)
    assert sorted(s["name"] for s in merged.sources) == ["lora2", "plain"]  # in the canonical order


def _nan_copy(expert: Expert, target):
    shutil.copytree(expert.path, target)
    (target / "manifest.json").unlink()  # weights written by something other than adapterfuse
    state = load_file(str(target / "adapter_model.safetensors"))
    state[sorted(state)[0]][0, 0] = float("nan")
    save_file(state, str(target / "adapter_model.safetensors"))
    return target


@pytest.fixture(scope="module")
def foreign(other_base, lib):
    """An expert trained on other_base (same shapes, different weights)."""
    _, data, root = lib
    return train_expert(other_base, "sst2", tiny_config(), out=root / "foreign", data=data, progress=False)


def _bad_cases(experts, foreign, tmp_path):
    pair = [experts["lora4"], experts["lora2"]]
    return [
        (CompatibilityError, "fingerprint", [experts["lora4"], foreign], {"method": "uniform"}),
        (ConfigError, "2 weights for 3 experts", [*pair, experts["ada"]], {"weights": [1.0, 2.0]}),
        (ConfigError, "weights", pair, {"method": "task_arithmetic", "weights": [1.0, float("nan")]}),
        (ExpertError, "non-finite", [_nan_copy(experts["lora4"], tmp_path / "nan"), experts["lora2"]], {}),
        (ConfigError, "density", pair, {"density": 0.0}),
        (ConfigError, "density", pair, {"density": 1.5}),
        (ConfigError, "unknown merge method 'mean'.*greedy_soup", [tmp_path / "missing"], {"method": "mean"}),
        (ConfigError, "densty.*Accepted parameters", [tmp_path / "missing"], {"densty": 0.3}),
        (ConfigError, "greedy_soup.*validation", pair, {"method": "greedy_soup"}),
        (ConfigError, "takes none", pair, {"method": "learned", "weights": [1.0, 1.0]}),
        (ExpertError, "not found and not a Hub id", [experts["lora4"].path, tmp_path / "missing"], {}),
    ]


def test_bad_inputs_are_clear_errors_and_leave_no_output(lib, foreign, tmp_path):
    experts, _, _ = lib
    for error, match, items, kwargs in _bad_cases(experts, foreign, tmp_path):
        out = tmp_path / "out"
        with pytest.raises(error, match=match):
            merge(items, **kwargs).save_pretrained(out)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_base_other_than_the_experts_is_refused(lib, other_base):
    experts, _, _ = lib
    with pytest.raises(CompatibilityError, match="fingerprint"):
        merge([experts["lora4"]], method="uniform", base=other_base)


def test_existing_output_and_full_without_base(lib, tmp_path):
    experts, _, _ = lib
    merged = merge([experts["lora4"]], method="uniform")
    with pytest.raises(ConfigError, match="needs the base"):
        merged.save_pretrained(tmp_path / "full", full=True)
    assert not (tmp_path / "full").exists()
    target = merged.save_pretrained(tmp_path / "m")
    before = (target / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite"):
        merge([experts["lora2"]], method="uniform").save_pretrained(target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    merge([experts["lora2"]], method="uniform").save_pretrained(target, overwrite=True)
    assert (target / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_hub_id_that_cannot_be_downloaded_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ExpertError, match=r"'someone/some-adapter'.*could not download"):
        merge(["someone/some-adapter"], method="uniform")


def test_push_to_hub_saves_a_folder_and_hands_it_to_push_folder(lib, monkeypatch):
    import adapterfuse.io.hub

    experts, _, _ = lib
    seen = {}

    def fake_push(folder, repo_id, **kwargs):
        seen.update(files=sorted(p.name for p in folder.iterdir()), repo_id=repo_id, **kwargs)
        return "pushed"

    monkeypatch.setattr(adapterfuse.io.hub, "push_folder", fake_push)
    assert merge([experts["lora4"]], method="uniform").push_to_hub("me/merged", token="t", private=True) == "pushed"
    assert seen == {
        "files": ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapterfuse.json", "manifest.json"],
        "repo_id": "me/merged",
        "token": "t",
        "private": True,
    }


def test_merged_adapter_round_trips_its_state(lib):
    experts, _, _ = lib
    merged = merge([experts["lora4"], experts["ada"]], method="uniform")
    assert isinstance(merged, MergedAdapter)
    state, config = merged.peft_files()
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-llama-0"
    assert sum(t.numel() for t in state.values()) == merged.num_params
    sources = copy.deepcopy(merged.metadata())["sources"]  # in canonical order (by weight hash)
    assert {s["name"]: s["peft_type"] for s in sources} == {"lora4": "LORA", "ada": "ADALORA"}


def test_merge_combiner_fits_the_library_into_one_predictor(lib, tiny_base):
    from adapterfuse.backends.merge.api import MergeCombiner
    from adapterfuse.library import ExpertLibrary

    experts, data, _ = lib
    library = ExpertLibrary([experts[n] for n in NAMES])
    predictor = MergeCombiner(tiny_base, MergeConfig(method="task_arithmetic", lam=0.5)).fit(library, None)
    expected = merge([experts[n] for n in NAMES], method="task_arithmetic", lam=0.5).predictor(tiny_base)
    assert predictor.name == "merge:task_arithmetic"
    assert torch.equal(predictor.predict_proba(TASK, data.test), expected.predict_proba(TASK, data.test))
