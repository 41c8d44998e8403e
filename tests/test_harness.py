from __future__ import annotations

import json
import shutil

import pytest
import torch

from adapterfuse.errors import ConfigError, ExpertError
from adapterfuse.expert import attach_experts
from adapterfuse.harness import OraclePredictor, ZeroShotPredictor, evaluate, results_table
from adapterfuse.head import predict_proba
from adapterfuse.library import ExpertLibrary
from adapterfuse.train.expert import train_expert
from tests.helpers import tiny_config, tiny_data


@pytest.fixture(scope="module")
def two_experts(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    config = tiny_config()
    sst2, rte = tiny_data(root / "glue", "sst2", config), tiny_data(root / "glue", "rte", config)
    lora = train_expert(tiny_base, "sst2", config, out=root / "sst2", data=sst2, progress=False)
    ada = train_expert(
        tiny_base,
        "rte",
        tiny_config(method="adalora", adalora_init_r=6, adalora_delta_t=1),
        out=root / "rte",
        data=rte,
        progress=False,
    )
    return [lora, ada], [sst2, rte]


def test_zero_shot_evaluation_reports_metrics_average_and_cost(tiny_base, two_experts):
    _, data = two_experts
    result = evaluate(ZeroShotPredictor(tiny_base, autocast=False), data)
    assert set(result["tasks"]) == {"sst2", "rte"}
    assert result["average"] == pytest.approx((result["tasks"]["sst2"]["score"] + result["tasks"]["rte"]["score"]) / 2)
    assert result["tasks"]["sst2"]["n"] == 20 and result["examples_per_s"] > 0
    assert result["cost"] == {"stored_params": 0, "forward_passes": 1.0, "memory_bytes": 0}


def test_oracle_answers_each_task_with_its_own_expert(tiny_base, two_experts):
    experts, data = two_experts
    oracle = OraclePredictor(tiny_base, ExpertLibrary(experts), autocast=False)
    for expert, td in zip(experts, data, strict=False):
        alone = predict_proba(expert.attach(tiny_base.model), tiny_base.tokenizer, td.task, td.test, autocast=False)
        # the AdaLoRA expert is folded into plain LoRA inside the oracle: same ΔW, same answers
        torch.testing.assert_close(oracle.predict_proba(td.task, td.test), alone, rtol=0, atol=1e-5)
    result = evaluate(oracle, data)
    assert result["cost"]["stored_params"] == sum(t.numel() for e in experts for t in e.state_dict.values())
    table = results_table([result, evaluate(ZeroShotPredictor(tiny_base), data)])
    assert "| oracle |" in table and "| base zero-shot |" in table and "sst2 accuracy" in table


def test_oracle_answers_with_experts_whose_folder_names_hold_dots(tiny_base, two_experts, tmp_path):
    experts, data = two_experts
    # Grid members are saved as e.g. lr0.0005-rank4; PEFT refuses '.' in adapter names.
    folders = [tmp_path / name for name in ("lr0.0005-rank4", "lr0.002-rank16")]
    for expert, folder in zip(experts, folders, strict=True):
        shutil.copytree(expert.path, folder)
    library = ExpertLibrary.load(folders)
    assert [e.name for e in library] == ["lr0.0005-rank4", "lr0.002-rank16"]
    oracle = OraclePredictor(tiny_base, library, autocast=False)
    for expert, td in zip(experts, data, strict=True):
        alone = predict_proba(expert.attach(tiny_base.model), tiny_base.tokenizer, td.task, td.test, autocast=False)
        torch.testing.assert_close(oracle.predict_proba(td.task, td.test), alone, rtol=0, atol=1e-5)
    peft_model = attach_experts(tiny_base.model, list(library))
    assert sorted(peft_model.peft_config) == ["lr0_0005-rank4", "lr0_002-rank16"]
    with pytest.raises(ExpertError, match=r"adapter name 'a\.b': .*cannot hold '\.'.*'a_b'"):
        attach_experts(tiny_base.model, experts[:1], ["a.b"])


def test_oracle_without_an_expert_for_the_task_is_a_clear_error(tiny_base, two_experts):
    experts, data = two_experts
    oracle = OraclePredictor(tiny_base, ExpertLibrary(experts[:1]))
    with pytest.raises(ConfigError, match="no expert for task 'rte'"):
        oracle.predict_proba(data[1].task, data[1].test)


def test_oracle_saves_a_folder_with_its_experts(tiny_base, two_experts, tmp_path):
    experts, _ = two_experts
    OraclePredictor(tiny_base, ExpertLibrary(experts)).save(tmp_path / "oracle")
    assert json.loads((tmp_path / "oracle" / "manifest.json").read_text())["kind"] == "oracle"
    assert (tmp_path / "oracle" / "sst2" / "adapter_model.safetensors").is_file()
    assert ExpertLibrary.load([tmp_path / "oracle" / "sst2", tmp_path / "oracle" / "rte"])


def test_bad_split(tiny_base, two_experts):
    with pytest.raises(ConfigError, match="split"):
        evaluate(ZeroShotPredictor(tiny_base), two_experts[1], split="dev")
