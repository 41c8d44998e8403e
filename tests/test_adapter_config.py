"""Plain PEFT adapters folded exactly as PEFT applies them, and the variants that cannot be folded refused by name."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from packaging import version

from adapterfuse.errors import ExpertError
from adapterfuse.expert import Expert
from tests.helpers import plain_peft_model

TARGETS = ["q_proj", "v_proj"]


def _peft_folder(base, folder, config, seed: int = 0, adalora_masks: dict | None = None):
    """Save a PEFT adapter with random non-zero factors (AdaLoRA: random E and, optionally, pruned budgets)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base.model), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    if adalora_masks is not None:
        model.peft_config["default"].rank_pattern = {f"{m}.lora_E.default": mask for m, mask in adalora_masks.items()}
    model.save_pretrained(str(folder))
    return folder


def _merged_reference(base, folder) -> dict[str, torch.Tensor]:
    """Every linear weight after PEFT's own ``merge_and_unload``."""
    merged = plain_peft_model(base.model, folder).merge_and_unload()
    return {n: m.weight.detach().clone() for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear)}


def _assert_folds_like_peft(base, folder) -> dict:
    expert = Expert.load(folder)
    deltas = expert.deltas
    reference = _merged_reference(base, folder)
    for module, weight in reference.items():
        ours = base.model.get_submodule(module).weight.detach()
        if module in deltas:
            ours = ours + deltas[module].dense()
        torch.testing.assert_close(ours, weight, rtol=0, atol=1e-6, msg=module)
    return deltas


def test_regex_rank_and_alpha_patterns_fold_like_peft(tiny_base, tmp_path):
    from peft import LoraConfig

    key = r".*\.layers\.1\..*(q_proj|v_proj)$"
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={key: 8},
        alpha_pattern={key: 32},
        init_lora_weights=False,
    )
    from peft.utils.other import get_pattern_key

    deltas = _assert_folds_like_peft(tiny_base, _peft_folder(tiny_base, tmp_path / "regex", config))
    q1 = "model.layers.1.self_attn.q_proj"
    # PEFT before 0.15 matched pattern keys as name suffixes only, so there the key matches nothing.
    regex = get_pattern_key([key], q1) == key
    assert regex or version.parse(peft.__version__) < version.parse("0.15")
    assert deltas[q1].rank == (8 if regex else 4) and deltas["model.layers.0.self_attn.q_proj"].rank == 4


def test_rslora_folds_like_peft(tiny_base, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True, init_lora_weights=False)
    _assert_folds_like_peft(tiny_base, _peft_folder(tiny_base, tmp_path / "rslora", config))


def test_lora_alpha_zero_folds_like_peft(tiny_base, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=0, target_modules=TARGETS, init_lora_weights=False)
    deltas = _assert_folds_like_peft(tiny_base, _peft_folder(tiny_base, tmp_path / "alpha0", config))
    assert all(d.dense().abs().max() == 0 for d in deltas.values())  # PEFT scales by 0/r


@pytest.mark.parametrize("alpha", [0, 6])
def test_adalora_budgets_and_alpha_zero_fold_like_peft(tiny_base, tmp_path, alpha):
    from peft import AdaLoraConfig

    config = AdaLoraConfig(init_r=6, target_r=4, lora_alpha=alpha, target_modules=TARGETS, total_step=10)
    masks = {
        "model.layers.0.self_attn.q_proj": [True, False, True, True, False, False],
        "model.layers.1.self_attn.v_proj": [False] * 5 + [True],
    }
    folder = _peft_folder(tiny_base, tmp_path / f"ada{alpha}", config, adalora_masks=masks)
    deltas = _assert_folds_like_peft(tiny_base, folder)
    assert deltas["model.layers.0.self_attn.q_proj"].rank == 3 and deltas["model.layers.0.self_attn.v_proj"].rank == 6
    if alpha == 0:  # PEFT scales by the module's rank when alpha is 0, not by 0
        assert deltas["model.layers.1.self_attn.v_proj"].dense().abs().max() > 0


def test_dora_adapter_is_refused_by_name(tiny_base, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    folder = _peft_folder(tiny_base, tmp_path / "dora", config)
    with pytest.raises(ExpertError, match=r"'dora'.*use_dora=True: DoRA"):
        _ = Expert.load(folder).deltas


def test_embedding_lora_is_refused_by_name(tiny_base, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    folder = _peft_folder(tiny_base, tmp_path / "emb", config)
    with pytest.raises(ExpertError, match="LoRA on an embedding"):
        _ = Expert.load(folder).deltas


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("lora_bias", True, "lora_bias"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "all", "bias='all'"),
        ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
        ("layer_replication", [[0, 2]], "layer_replication"),
        ("alora_invocation_tokens", [1, 2], "aLoRA"),
        ("use_new_thing", True, "PEFT .* does not know"),
    ],
)
def test_forward_changing_options_are_refused_by_name(tiny_base, tmp_path, field, value, named):
    from peft import LoraConfig

    folder = _peft_folder(tiny_base, tmp_path / "x", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    expert = Expert.load(folder)
    with pytest.raises(ExpertError, match=named):
        _ = Expert(expert.name, config, expert.state_dict).deltas
