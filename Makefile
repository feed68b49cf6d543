# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv if it is missing and install the pinned set from requirements.lock.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock setup.cfg | cksum | cut -d' ' -f1)

# No hub on CI or this machine: fail at once instead of retrying for a minute per lookup.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
# DeepSpeed builds a comm op on first use (~29 s); keep the build between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo demo-xmtf test test-fast bench bench-check learning-check merge-check clean help

help:
	@echo "make demo   - set up .venv and run the demo: train a tiny T5 on data_mixtures/demo_train.yaml, zero-shot eval on COPA"
	@echo "make demo-xmtf - the multilingual demo: a tiny ByT5 on English tasks + an xP3-format sample, XCOPA in 11 languages"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make bench  - run the benchmarks in scripts/ (2 processes each, pooled) and rewrite BENCHMARKS.md"
	@echo "make bench-check - run them again; BENCHMARKS.md says which ratios land inside make bench's spreads"
	@echo "make learning-check - train a small T5 from scratch on 3 real tasks (needs ../shared), ablations, BENCHMARKS.md"
	@echo "make merge-check - experts per task from one base, merged 5 ways vs multitask (needs ../shared), BENCHMARKS.md"

$(STAMP): requirements.lock setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: install
	@rm -rf runs/demo
	$(VENV)/bin/mtf train configs/demo.yaml
	$(VENV)/bin/mtf report runs/demo

demo-xmtf: install
	@rm -rf runs/xmtf_demo
	$(VENV)/bin/mtf train configs/xmtf_demo.yaml
	$(VENV)/bin/mtf report runs/xmtf_demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) scripts/write_benchmarks.py --out BENCHMARKS.md

bench-check: install
	$(PY) scripts/write_benchmarks.py --out BENCHMARKS.md --check-against runs/bench/results.json

learning-check: install
	$(PY) scripts/learning_check.py --write-benchmarks BENCHMARKS.md --plot docs

merge-check: install
	$(PY) scripts/merge_check.py --write-benchmarks BENCHMARKS.md

clean:
	rm -rf runs .pytest_cache .cache
