"""A trained expert's files are the same bytes in every process: PEFT's set of target modules is written sorted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapterfuse.train.config import ALL_LINEAR
from adapterfuse.train.expert import train_expert
from tests.helpers import tiny_config, tiny_data, write_glue_dir

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
    import sys
    from pathlib import Path
    from adapterfuse.base import load_default_tokenizer, wrap_base
    from adapterfuse.tasks.glue import load_task
    from adapterfuse.train.config import ALL_LINEAR
    from adapterfuse.train.expert import train_expert
    from tests.helpers import make_tiny_model, tiny_config
    tokenizer = load_default_tokenizer()
    base = wrap_base(make_tiny_model(tokenizer), tokenizer, "tiny-llama-0")
    config = tiny_config(max_train_examples=8, max_eval_examples=4)
    data = load_task("sst2", config.validation_size, config.seed, config.max_train_examples, glue_dir=sys.argv[1])
    train_expert(base, "sst2", config, out=Path(sys.argv[2]), data=data, progress=False)
"""


def test_a_trained_adapter_config_lists_its_modules_sorted(tiny_base, tmp_path):
    config = tiny_config(max_train_examples=8, max_eval_examples=4)  # all seven linear modules
    train_expert(tiny_base, "sst2", config, out=tmp_path / "e", data=tiny_data(tmp_path / "glue"), progress=False)
    written = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(ALL_LINEAR)


@pytest.mark.slow  # two processes, each importing torch and transformers
def test_adapter_config_is_the_same_bytes_under_different_hash_seeds(tmp_path):
    glue = write_glue_dir(tmp_path / "glue")
    children = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed, "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [sys.executable, "-c", textwrap.dedent(TRAIN), str(glue), str(tmp_path / f"expert-{seed}")]
        children.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True))
    for child in children:
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err
    first, second = ((tmp_path / f"expert-{s}" / "adapter_config.json").read_bytes() for s in ("1", "2"))
    assert first == second
    modules = json.loads(first)["target_modules"]
    assert modules == sorted(modules) and len(modules) == 7
