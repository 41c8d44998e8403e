from __future__ import annotations

import pytest

from adapterfuse.errors import ConfigError, DataError
from adapterfuse.head import label_token_ids
from adapterfuse.tasks.glue import TASKS, get_task, load_task, parse_tasks, read_split


def test_reads_every_fixture_task_with_labels_in_hub_order(glue_dir):
    sst2 = read_split(get_task("sst2"), "train")
    assert len(sst2) == 60 and sst2[1].label == 1 and len(sst2[0].fields) == 1
    cola = read_split(get_task("cola"), "dev")  # no header row
    assert len(cola) == 20 and cola[0].fields[0].endswith(".") and cola[1].label == 1
    mrpc = read_split(get_task("mrpc"), "train")  # header starts with a byte-order mark
    assert len(mrpc) == 60 and len(mrpc[0].fields) == 2
    rte = read_split(get_task("rte"), "train")
    assert [e.label for e in rte[:2]] == [0, 1]  # entailment -> 0, as nyu-mll/glue numbers it
    stsb = read_split(get_task("stsb"), "train")
    assert stsb[3].label == pytest.approx(1.11) and isinstance(stsb[3].label, float)


def test_validation_is_carved_from_train_and_never_overlaps(glue_dir):
    data = load_task("sst2", validation_size=15, seed=3)
    train_rows = {e.idx for e in data.train}
    val_rows = {e.idx for e in data.validation}
    assert len(val_rows) == 15 and len(train_rows) == 45
    assert not train_rows & val_rows
    assert train_rows | val_rows == set(range(60))
    assert len(data.test) == 20


def test_validation_prefixes_are_random_subsets_not_the_start_of_the_file(glue_dir):
    # Callers fit on the first n validation examples; files are grouped by source, so those must not be
    # the n earliest rows of the carve.
    rows = [e.idx for e in load_task("sst2", validation_size=30, seed=0).validation]
    assert rows != sorted(rows)
    assert max(rows[:10]) > sorted(rows)[9]
    assert [e.idx for e in load_task("sst2", validation_size=30, seed=0).validation] == rows


def test_splits_are_seeded(glue_dir):
    a, b, c = (load_task("rte", validation_size=10, seed=s, max_train=20) for s in (1, 1, 2))
    assert [e.idx for e in a.validation] == [e.idx for e in b.validation]
    assert [e.idx for e in a.train] == [e.idx for e in b.train]
    assert [e.idx for e in a.validation] != [e.idx for e in c.validation]
    assert len(a.train) == 20


def test_missing_file_names_path_and_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        read_split(get_task("rte"), "train")
    msg = str(err.value)
    assert str(tmp_path / "RTE" / "train.tsv") in msg and "GLUE_DIR" in msg and "nyu-mll/glue" in msg


def test_bad_label_and_bad_sizes(glue_dir):
    (glue_dir / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine .\t7\n")
    with pytest.raises(DataError, match="label 7 out of range"):
        read_split(get_task("sst2"), "dev")
    with pytest.raises(ConfigError, match="validation_size"):
        load_task("sst2", validation_size=60)
    with pytest.raises(ConfigError, match="max_train"):
        load_task("sst2", max_train=-1)


def test_task_names():
    assert [t.name for t in parse_tasks("SST-2, sts-b,rte,rte")] == ["sst2", "stsb", "rte"]
    assert get_task("mnli_mm").train_task == "mnli"
    with pytest.raises(ConfigError, match="unknown"):
        get_task("squad")
    with pytest.raises(ConfigError, match="at least one"):
        parse_tasks(" , ")


def test_every_label_word_is_one_token_of_the_base_tokenizer(tokenizer):
    for task in TASKS.values():
        ids = label_token_ids(task, tokenizer)
        assert len(ids) == task.n_labels and len(set(ids)) == task.n_labels


def test_multi_token_label_word_is_refused(tokenizer):
    import dataclasses

    bad = dataclasses.replace(get_task("rte"), label_words=(" entailment", " no"))
    with pytest.raises(ConfigError, match="2 tokens"):
        label_token_ids(bad, tokenizer)
