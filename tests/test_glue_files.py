"""Broken GLUE files: each is one DataError naming the file (and line), or rows skipped with a count."""

from __future__ import annotations

import pytest

from adapterfuse.errors import AdapterFuseWarning, DataError
from adapterfuse.tasks.glue import get_task, load_task, read_split
from tests.helpers import write_glue_dir


@pytest.fixture()
def glue(tmp_path):
    return write_glue_dir(tmp_path / "glue", n_train=300)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"train\.tsv: empty; expected the tab-separated text file of the GLUE download script"),
        (b"sentence\tlabel\n", r"train\.tsv: no examples \(0 rows after the header, none usable\)"),
        (bytes(range(256)) * 4, r"train\.tsv: not UTF-8 text \(byte 128 cannot be decoded\)"),
        (b"sentence\tlabel\nfine\x00\t1\n", r"train\.tsv: holds NUL bytes, so it is a binary file"),
        (b"sentence\tlabel\ngood\tpositive\n", r"train\.tsv:2: label 'positive' is not valid for task sst2"),
    ],
    ids=["empty", "header only", "binary", "NUL bytes", "text label"],
)
def test_an_unusable_file_is_one_data_error_naming_it(glue, content, message):
    (glue / "SST-2" / "train.tsv").write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        load_task("sst2", validation_size=8, glue_dir=glue)
    assert "\n" not in str(e.value) and str(glue / "SST-2" / "train.tsv") in str(e.value)


def test_an_empty_file_without_a_header_is_refused_too(glue):
    (glue / "CoLA" / "dev.tsv").write_bytes(b"")
    with pytest.raises(DataError, match=r"CoLA/dev\.tsv: empty"):
        read_split(get_task("cola"), "dev", glue)


@pytest.mark.parametrize("score", ["nan", "9.5", "inf", "-inf", "-0.5", "five"])
def test_an_sts_b_score_outside_0_to_5_names_its_line(glue, score):
    path = glue / "STS-B" / "dev.tsv"
    lines = path.read_text().splitlines()
    fields = lines[3].split("\t")
    lines[3] = "\t".join([*fields[:-1], score])
    path.write_text("\n".join(lines) + "\n")
    expected = "is not valid for task stsb; expected a number" if score == "five" else "out of range for task stsb"
    with pytest.raises(DataError, match=rf"dev\.tsv:4: (score|label) '{score}' {expected}"):
        load_task("stsb", validation_size=8, glue_dir=glue)


def test_sts_b_scores_at_the_bounds_are_kept(glue):
    path = glue / "STS-B" / "dev.tsv"
    lines = path.read_text().splitlines()
    for i, score in ((1, "0"), (2, "5.0")):
        lines[i] = "\t".join([*lines[i].split("\t")[:-1], score])
    path.write_text("\n".join(lines) + "\n")
    test = load_task("stsb", validation_size=8, glue_dir=glue).test
    assert [e.label for e in test[:2]] == [0.0, 5.0]


def _break_rows(path, rows: list[int]) -> None:
    lines = path.read_text().splitlines()
    for i in rows:
        lines[i] = lines[i].split("\t")[0]  # the label column is gone
    path.write_text("\n".join(lines) + "\n")


def test_a_few_malformed_rows_are_skipped_with_one_warning_that_counts_them(glue):
    clean = load_task("sst2", validation_size=8, glue_dir=glue)
    _break_rows(glue / "SST-2" / "train.tsv", [5, 17, 40])  # 3 of 300 rows, 1%
    with pytest.warns(
        AdapterFuseWarning, match=r"train\.tsv: skipped 3 of 300 rows with too few columns \(lines 6, 18, 41\)"
    ) as w:
        broken = load_task("sst2", validation_size=8, glue_dir=glue)
    assert len([x for x in w if issubclass(x.category, AdapterFuseWarning)]) == 1
    assert len(broken.train) + len(broken.validation) == len(clean.train) + len(clean.validation) - 3


def test_too_many_malformed_rows_refuse_the_file(glue):
    _break_rows(glue / "SST-2" / "train.tsv", [5, 17, 40, 41])  # 4 of 300 rows, over 1%
    with pytest.raises(DataError, match=r"train\.tsv: 4 of 300 rows have too few columns \(lines 6, 18, 41, 42\)"):
        load_task("sst2", validation_size=8, glue_dir=glue)
