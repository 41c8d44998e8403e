"""Servable outputs: r and the patterns of a merged folder, and the vLLM-rules check of any LoRA folder."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from adapterfuse.backends.merge.api import merge
from adapterfuse.cli.main import main
from adapterfuse.errors import ConfigError
from adapterfuse.serving import VLLM_MAX_LORA_RANKS, check_serving, slot_rank
from tests.helpers import plain_peft_model, random_expert

LLAMA = "LlamaForCausalLM"


@pytest.fixture(scope="module")
def mixed(tiny_base, tmp_path_factory):
    """A TIES merge at rank auto of a rank-3 and a rank-12 expert: its modules have many ranks."""
    experts = [
        random_expert(tiny_base, "a", rank=3, seed=1),
        random_expert(tiny_base, "b", rank=12, seed=2, modules=["model.layers.0.self_attn.q_proj"]),
    ]
    merged = merge(experts, method="ties", density=0.3, base=tiny_base)
    folder = merged.save_pretrained(tmp_path_factory.mktemp("serving") / "ties")
    return merged, folder


def test_slot_rank_is_the_least_vllm_rank_holding_it() -> None:
    assert [slot_rank(r) for r in (1, 2, 8, 9, 19, 300, 512, 600)] == [1, 8, 8, 16, 32, 320, 512, 600]
    assert all(slot_rank(r) in VLLM_MAX_LORA_RANKS for r in range(1, 513))


def test_mixed_rank_output_is_servable_and_loads_in_peft_with_equal_delta(mixed, tiny_base) -> None:
    merged, folder = mixed
    ranks = {m: d.rank for m, d in merged.deltas.items()}
    assert len(set(ranks.values())) > 2  # rank auto: each module its own rank
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == slot_rank(max(ranks.values())) >= max(ranks.values()) and config["r"] in VLLM_MAX_LORA_RANKS
    assert config["lora_alpha"] == config["r"]
    report = check_serving(folder, architecture=LLAMA)
    assert report.ok, report.problems
    assert report.max_lora_rank == config["r"] and report.ranks == ranks
    peft_model = plain_peft_model(tiny_base.model, folder)
    for module, delta in merged.deltas.items():
        layer = peft_model.base_model.model.get_submodule(module)
        assert layer.r["default"] == delta.rank
        got = layer.get_delta_weight("default").double()
        assert float((got - delta.dense(torch.float64)).abs().max()) < 1e-6 * max(1.0, float(got.abs().max()))


def test_metadata_and_card_report_rank_and_error_per_module(mixed) -> None:
    merged, folder = mixed
    meta = json.loads((folder / "adapterfuse.json").read_text())
    assert meta["ranks"] == {m: d.rank for m, d in merged.deltas.items()}
    assert meta["truncation_error"]["per_module"] == pytest.approx(merged.per_module_error)
    assert max(meta["truncation_error"]["per_module"].values()) <= 0.1**0.5 + 1e-6  # energy 0.9
    card = (folder / "README.md").read_text()
    module = "model.layers.0.self_attn.q_proj"
    assert "## Rank and truncation error per module" in card
    assert f"| `{module}` | {meta['ranks'][module]} | {meta['truncation_error']['per_module'][module]:.3e} |" in card


def _edited(folder, tmp_path, **changes):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_r_below_a_module_rank_is_reported(mixed, tmp_path) -> None:
    # What writing the most common rank as r gives: vLLM validates r and then cannot fit the larger module.
    merged, folder = mixed
    ranks = {m: d.rank for m, d in merged.deltas.items()}
    top = max(ranks, key=ranks.__getitem__)
    low = min(ranks.values())
    patterns = {m: r for m, r in ranks.items() if r != low}
    bad = _edited(folder, tmp_path, r=low, lora_alpha=low, rank_pattern=patterns, alpha_pattern=patterns)
    report = check_serving(bad, architecture=LLAMA)
    assert not report.ok
    assert any(f"module {top!r}: rank {ranks[top]} exceeds r={low}" in p for p in report.problems)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"use_dora": True}, "use_dora: true; vLLM does not serve DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save: ['lm_head']; vLLM only supports"),
        ({"bias": "all"}, "bias: 'all'"),
        ({"peft_type": "LOHA"}, "peft_type: expected LORA, got LOHA"),
        ({"alpha_pattern": {"model.layers.0.self_attn.q_proj": 1.0}}, "PEFT scales it by"),
        ({"use_rslora": True, "alpha_pattern": {}}, "PEFT scales it by"),
    ],
)
def test_each_rule_vllm_applies_is_checked(mixed, tmp_path, changes: dict, expected: str) -> None:
    _, folder = mixed
    report = check_serving(_edited(folder, tmp_path, **changes), architecture=LLAMA)
    assert any(expected in p for p in report.problems), report.problems


def test_required_fields_slot_and_module_names(mixed, tmp_path) -> None:
    _, folder = mixed
    bad = tmp_path / "no_target"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    del config["target_modules"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert any("missing required field(s) ['target_modules']" in p for p in check_serving(bad).problems)
    r = config["r"]
    small = max(v for v in VLLM_MAX_LORA_RANKS if v < r)
    assert any(f"r: {r} exceeds max_lora_rank {small}" in p for p in check_serving(folder, small, LLAMA).problems)
    phi = check_serving(folder, architecture="Phi3ForCausalLM")  # fused qkv_proj there: q_proj is not a target
    assert any("vLLM applies LoRA to" in p and "not 'q_proj'" in p for p in phi.problems)
    unknown = check_serving(folder)  # the tiny base has no config on disk: names cannot be checked
    assert unknown.ok and unknown.notes == ["architecture unknown: module names not checked"]


def test_not_an_adapter_folder_or_a_bad_slot_is_one_line_error(mixed, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"missing \['adapter_config.json', 'adapter_model.safetensors'\]"):
        check_serving(tmp_path)
    with pytest.raises(ConfigError, match=r"max_lora_rank: expected one of \[1, 8, 16, .*512\] .*got 12"):
        check_serving(mixed[1], max_lora_rank=12)


def test_cli_check_serving_exit_status(mixed, tmp_path, capsys) -> None:
    _, folder = mixed
    assert main(["check-serving", str(folder), "--architecture", LLAMA]) == 0
    assert "servable by vLLM with --max-lora-rank" in capsys.readouterr().out
    assert main(["check-serving", str(_edited(folder, tmp_path, use_dora=True)), "--architecture", LLAMA]) == 1
    captured = capsys.readouterr()
    assert "not servable as written" in captured.out and "use_dora: true" in captured.err
    assert main(["check-serving", str(tmp_path / "nowhere")]) == 1
    assert "missing" in capsys.readouterr().err


def test_architecture_is_read_from_the_base(mixed, tmp_path, tiny_base) -> None:
    _, folder = mixed
    config = copy.deepcopy(tiny_base.model.config)
    config.architectures = [LLAMA]  # as a saved model's config.json records it
    config.save_pretrained(tmp_path / "base")  # a local base folder: its config.json is read
    assert (
        check_serving(_edited(folder, tmp_path, base_model_name_or_path=str(tmp_path / "base"))).architecture == LLAMA
    )
    shutil.rmtree(tmp_path / "edited")
    default = _edited(folder, tmp_path, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    report = check_serving(default)
    assert report.architecture == LLAMA and report.ok and not report.notes
