"""Pushes that replace a repo's content, Retry-After, offline mode, bad repo ids, and the cards the Hub indexes.

Everything runs against the fake Hub on 127.0.0.1 through the real huggingface_hub client.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from adapterfuse.backends.merge.api import merge
from adapterfuse.expert import Expert
from adapterfuse.io.card import adapter_phrase
from adapterfuse.io.hub import HubError, Retry, push_folder
from adapterfuse.io.retry import retry_after_seconds
from adapterfuse.train.expert import train_expert
from tests.fake_hub_server import TOKEN, FakeHub
from tests.helpers import tiny_config, tiny_data

REPO = "alice/sst2-lora"
COMMIT = f"/api/models/{REPO}/commit/"


pytestmark = pytest.mark.usefixtures("hub_env")  # the fake Hub's `hub` fixture is in conftest.py


def _folder(root: Path, files: dict[str, str]) -> Path:
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _push(folder: Path, hub: FakeHub, sleeps: list[float] | None = None, **kwargs):
    retry = kwargs.pop("retry", None) or Retry(sleep=(sleeps if sleeps is not None else []).append)
    return push_folder(folder, REPO, token=TOKEN, endpoint=hub.endpoint, retry=retry, **kwargs)


A = {"adapter_config.json": '{"r": 4}', "adapter_model.safetensors": "A", "extra/notes.txt": "from A", "a.json": "{}"}
B = {"adapter_config.json": '{"r": 8}', "adapter_model.safetensors": "B"}


def test_push_of_another_folder_is_refused_without_overwrite_and_nothing_is_committed(hub, tmp_path):
    _push(_folder(tmp_path / "a", A), hub)
    commits = len(hub.repos[REPO].commits)
    with pytest.raises(HubError) as err:
        _push(_folder(tmp_path / "b", B), hub)
    message = str(err.value)
    assert "\n" not in message and "2 file(s) the folder lacks" in message and "'a.json'" in message
    assert "--overwrite" in message
    assert len(hub.repos[REPO].commits) == commits  # nothing uploaded
    assert {k: v.decode() for k, v in hub.files(REPO).items()} == A


def test_push_with_overwrite_replaces_the_repo_content_in_one_commit(hub, tmp_path):
    _push(_folder(tmp_path / "a", A), hub)
    commits = len(hub.repos[REPO].commits)
    result = _push(_folder(tmp_path / "b", B), hub, overwrite=True)
    assert len(hub.repos[REPO].commits) == commits + 1
    assert {k: v.decode() for k, v in hub.files(REPO).items()} == B  # A's extra files are gone
    assert result.commit_sha == hub.repos[REPO].head.oid


def test_a_repo_holding_the_same_files_is_updated_without_overwrite(hub, tmp_path):
    folder = _folder(tmp_path / "a", A)
    _push(folder, hub)
    (folder / "a.json").write_text('{"v": 2}')
    _push(folder, hub)
    assert hub.files(REPO)["a.json"] == b'{"v": 2}'


@pytest.mark.parametrize("bad", ["alice/sst2-lora\n", "alice/sst2-lora\r\n", "\nalice/sst2-lora", "alice /x"])
def test_repo_id_with_a_newline_or_space_is_refused_in_one_line_before_any_request(hub, tmp_path, bad):
    folder = _folder(tmp_path / "a", B)
    with pytest.raises(HubError) as err:
        push_folder(folder, bad, token=TOKEN, endpoint=hub.endpoint)
    assert "\n" not in str(err.value) and "expected 'owner/name'" in str(err.value)
    assert hub.requests == []


def test_retry_after_is_honoured(hub, tmp_path):
    sleeps: list[float] = []
    hub.fail_next(COMMIT, [429, 503], method="POST", headers={"Retry-After": "7"})
    _push(_folder(tmp_path / "a", B), hub, sleeps)
    assert sleeps == [7.0, 7.0]  # the server's wait, not the backoff (1, 2)


def test_a_retry_after_longer_than_max_wait_fails_at_once(hub, tmp_path):
    sleeps: list[float] = []
    hub.fail_next(COMMIT, [429], method="POST", headers={"Retry-After": "3600"})
    with pytest.raises(HubError, match=r"HTTP 429; the Hub asks to wait 3600 s \(Retry-After\).*max_wait = 120 s"):
        _push(_folder(tmp_path / "a", B), hub, sleeps)
    assert sleeps == []


def test_retry_after_as_an_http_date():
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_offline_mode_raised_by_the_client_is_never_retried(hub, tmp_path, monkeypatch):
    """Even when offline mode is switched on past our own check, the client's refusal is not retried."""
    import huggingface_hub.utils
    from huggingface_hub import constants

    import adapterfuse.io.hub

    monkeypatch.setattr(adapterfuse.io.hub, "_check_online", lambda action, repo_id: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # huggingface_hub < 1.0 decides offline mode when it opens its (cached) session: open a new one, and again after.
    reset = getattr(huggingface_hub.utils, "reset_sessions", lambda: None)
    reset()
    sleeps: list[float] = []
    try:
        with pytest.raises(HubError, match=r"push of repo 'alice/sst2-lora': .*offline mode.*unset HF_HUB_OFFLINE"):
            _push(_folder(tmp_path / "a", B), hub, sleeps)
    finally:
        monkeypatch.undo()
        reset()
    assert sleeps == [] and hub.requests == []


def test_offline_mode_set_in_the_environment_after_import_is_refused(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=r"offline mode"):
        _push(_folder(tmp_path / "a", B), hub)
    assert hub.requests == []


# ----------------------------------------------------------------------------- cards
@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_card")
    data = tiny_data(root / "glue")
    expert = train_expert(tiny_base, "sst2", tiny_config(), out=root / "sst2-lora", data=data, progress=False)
    return expert, root


def _hub_base(expert: Expert, spec: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> Expert:
    """The same expert recorded as trained on a Hub base (the tiny test base has no Hub id)."""
    return Expert(expert.name, dict(expert.config), expert.state_dict, {**expert.meta, "base": {"spec": spec}})


def test_expert_card_has_the_metadata_the_hub_indexes(trained, tmp_path):
    expert, _ = trained
    folder = _hub_base(expert).save(tmp_path / "sst2-lora")
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "peft"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in data.tags and "adapterfuse" in data.tags
    assert data.datasets == ["nyu-mll/glue"] and data.pipeline_tag == "text-generation"
    (result,) = data.eval_results
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("nyu-mll/glue", "sst2", "validation")
    assert result.metric_type == "accuracy"
    assert result.metric_value == pytest.approx(expert.meta["scores"]["test"]["accuracy"], abs=1e-6)
    assert "PATH" not in card.text and f"PeftModel.from_pretrained(base_model, {str(folder)!r})" in card.text
    assert "A LoRA adapter trained with adapterfuse" in card.text
    assert '"lr": ' in card.text and '"rank": ' in card.text  # made through the Python API: its settings are shown


def test_a_trained_expert_card_names_the_folder_it_was_saved_to(trained):
    _, root = trained
    text = (root / "sst2-lora" / "README.md").read_text()
    assert f"PeftModel.from_pretrained(base_model, {str(root / 'sst2-lora')!r})" in text and ".tmp-" not in text


def test_a_local_base_is_named_in_the_body_only(trained):
    expert, _ = trained
    card = ModelCard(expert.card())
    assert card.data.base_model is None and not any(t.startswith("base_model:") for t in card.data.tags)
    assert "tiny-llama-0" in card.text


def test_adalora_card_grammar_and_the_recorded_command(trained):
    expert, _ = trained
    meta = {**expert.meta, "command": "adapterfuse train --task sst2 --method adalora --out runs/sst2"}
    ada = Expert("sst2-ada", {**expert.config, "peft_type": "ADALORA"}, expert.state_dict, meta)
    text = ada.card("someone/sst2-ada")
    assert "An AdaLoRA adapter trained" in text and "A ADALORA" not in text
    assert "```bash\nadapterfuse train --task sst2 --method adalora --out runs/sst2\n```" in text
    assert "PeftModel.from_pretrained(base_model, 'someone/sst2-ada')" in text
    assert [adapter_phrase(t) for t in ("LORA", "ADALORA", "IA3")] == [
        "A LoRA adapter",
        "An AdaLoRA adapter",
        "An IA3 adapter",
    ]


def test_merged_push_is_private_and_its_card_names_the_repo(trained, hub):
    expert, _ = trained
    merged = merge([_hub_base(expert)], method="uniform")
    merged.push_to_hub(REPO, token=TOKEN, endpoint=hub.endpoint, private=True, retry=Retry(sleep=lambda s: None))
    assert hub.repos[REPO].private
    card = ModelCard(hub.files(REPO)["README.md"].decode())
    assert f"PeftModel.from_pretrained(base_model, {REPO!r})" in card.text
    assert "merge" in card.data.tags and card.data.library_name == "peft"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in card.data.tags
    meta = json.loads(hub.files(REPO)["adapterfuse.json"])
    assert "command" not in meta  # made through the Python API


def test_a_failed_push_after_a_save_says_where_the_saved_folder_is(trained, hub, tmp_path):
    expert, _ = trained
    merged = merge([expert], method="uniform")
    saved = merged.save_pretrained(tmp_path / "merged")
    hub.fail_next("/api/repos/create", [403])
    with pytest.raises(HubError) as err:
        merged.push_to_hub(REPO, token=TOKEN, endpoint=hub.endpoint, saved=saved, retry=Retry(sleep=lambda s: None))
    message = str(err.value)
    assert "HTTP 403" in message and f"saved in {saved}" in message and f"adapterfuse push {saved} {REPO}" in message
    assert "\n" not in message and (saved / "adapter_model.safetensors").is_file()
