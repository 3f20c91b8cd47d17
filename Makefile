# Parameter Golf stack: `make smoke` runs the whole pipeline on CPU on data it builds itself;
# `make test` runs the test suite. See README.md for the real 8-GPU run.
PY ?= python3
NPROC ?= 8
TRAIN_SHARDS ?= 80
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# Triton for the CPU machines' interpreter tests of the Triton kernels; a CUDA torch brings its own, kept as is
TRITON_VERSION := 3.9.0
SMOKE_DIR ?= data/smoke
SMOKE_LOG_DIR ?= logs
SMOKE_ITERATIONS ?= 80
# A small model with every feature of the full one (loops, two-lane tail, XSA, GQA, partial RoPE),
# trained for SMOKE_ITERATIONS steps on the CPU. No wallclock cap (MAX_WALLCLOCK_SECONDS=0): the
# schedule, the loop switch-on and the warm-down follow the step count, so every run prints the same
# val_bpb however loaded the machine is. One thread: the sums then do not depend on the core count,
# and on a busy 2-core machine two threads spin against each other (6-10 s a step instead of 1.2 s).
SMOKE_ENV := OMP_NUM_THREADS=1 DATA_PATH=$(SMOKE_DIR)/datasets/fineweb10B_sp1024 TOKENIZER_PATH=$(SMOKE_DIR)/tokenizers/fineweb_1024_bpe.model \
	VOCAB_SIZE=1024 NUM_LAYERS=6 MODEL_DIM=96 NUM_HEADS=4 NUM_KV_HEADS=2 ROPE_DIMS=8 MLP_MULT=3 \
	LOOP_START=2 LOOP_END=3 PARALLEL_RESIDUAL_START=4 XSA_LAST_N=6 \
	TRAIN_SEQ_LEN=128 EVAL_SEQ_LEN=128 TRAIN_BATCH_TOKENS=8192 VAL_BATCH_TOKENS=16384 \
	MAX_WALLCLOCK_SECONDS=0 ITERATIONS=$(SMOKE_ITERATIONS) WARMUP_STEPS=0 COMPILE=0 EMA_DECAY=0.95 \
	TRAIN_LOG_EVERY=20 VAL_LOSS_EVERY=0 MATRIX_LR=0.03 LOG_DIR=$(SMOKE_LOG_DIR) RUN_ID=smoke \
	PASSTHROUGH_MAX_NUMEL=1024 GPTQ_CALIBRATION_BATCHES=8 TTT_CHUNK_TOKENS=16384 TTT_BATCH_SEQS=16 BYTE_CHECK_DOCS=150

.PHONY: setup smoke smoke-data test data train bench help

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# No torch yet: try PyTorch's CPU wheel index first (a few hundred MB instead of the CUDA build's
# gigabytes), failing fast when it cannot be reached (no retries, 5 s socket timeout), then the
# default index, where torch==2.13.0 on Linux x86-64 is the CUDA build (it runs on a CPU too).
setup: ## install what the trainer, the tools and the tests need (torch 2.13.0 first when none is installed)
	@$(PY) -c "import torch" 2>/dev/null \
	  || $(PY) -m pip install -q --retries 0 --timeout 5 --index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION) 2>/dev/null \
	  || { echo "setup: PyTorch's CPU wheel index did not serve torch==$(TORCH_VERSION); installing it from the default index (on Linux x86-64 that is the CUDA build, several GB)"; \
	       $(PY) -m pip install -q torch==$(TORCH_VERSION); }
	@$(PY) -m pip install -q -r requirements-test.txt

smoke-data: ## build the self-generated smoke corpus, tokenizer and shards (no download)
	@test -f $(SMOKE_DIR)/tokenizers/fineweb_1024_bpe.model || $(PY) data/make_smoke_corpus.py --out $(SMOKE_DIR) --build --vocab-size 1024

# The last run's log and artifact go first: a rerun starts a fresh log instead of appending to it.
smoke: setup smoke-data ## the whole pipeline on CPU in a few minutes; prints val_bpb (the same on every run)
	rm -f $(SMOKE_LOG_DIR)/smoke.txt $(SMOKE_LOG_DIR)/smoke.ptz
	env $(SMOKE_ENV) $(PY) train_gpt.py

test: setup ## the test suite (CPU, about 20 minutes on 2 cores)
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==$(TRITON_VERSION) \
	  || echo "test: no Triton wheel for this machine; the Triton interpreter tests will skip"
	$(PY) -m pytest -q tests

data: ## download the official SP8192 shards and tokenizer (TRAIN_SHARDS=80)
	$(PY) data/cached_challenge_fineweb.py --variant sp8192 --train-shards $(TRAIN_SHARDS)

train: ## the real run: torchrun on NPROC GPUs with the defaults (start-up checks first, in one process)
	$(PY) train_gpt.py --check
	torchrun --standalone --nproc_per_node=$(NPROC) train_gpt.py

bench: ## training throughput on this machine's GPU (full config, 60 steps)
	$(PY) tools/bench.py

# Records (tools/seeds.py, tools/record.py; see records/README.md). Variables: NAME, SEEDS, NPROC, AUTHOR,
# GITHUB_ID, SUMMARY, and optionally LOGS (default logs/$(NAME)_seed*.txt) and OUT (the parent folder).
.PHONY: seeds record
SEEDS ?= 1337,42,2025

seeds: ## one configuration for several seeds, resumable: make seeds NAME=mytrick [SEEDS=1337,42,2025] [NPROC=8]
	$(PY) tools/seeds.py --name "$(NAME)" --seeds "$(SEEDS)" --nproc $(NPROC)

record: ## a submission folder from the seeds' logs: make record NAME=... AUTHOR="..." GITHUB_ID=... SUMMARY="..."
	$(PY) tools/record.py --name "$(NAME)" --author "$(AUTHOR)" --github-id "$(GITHUB_ID)" --summary "$(SUMMARY)" \
		$(if $(LOGS),--logs $(LOGS)) $(if $(OUT),--out "$(OUT)")
