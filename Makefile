# The one entry point. Stages pass artifacts through data/ and out-*/:
#   make data train serve     collect the corpus, train, serve on :8000
#   make test                 the test suite (what CI runs)
# Every target depends on the virtualenv (a stamp file), so a fresh clone just works.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= python_code
DATA_DIR := data/$(DATASET)
OUT_DIR ?= out-code-assistant
# The GPU config where CUDA is present, else the CPU one sized for 10 minutes on 2 cores.
CONFIG ?= $(shell $(PY) -c "import torch; print('config/train_code_assistant.py' if torch.cuda.is_available() else 'config/train_code_assistant_cpu.py')" 2>/dev/null)
TRAIN_ARGS ?=
TEST_ARGS ?=

.PHONY: install data train plot quantize eval serve bench bench-prefix-cache test clean help bench-data validate-k8s monitoring-e2e container-smoke deploy-checks gpu-check
.DEFAULT_GOAL := help

help:
	@echo "make install | data | train | plot | quantize | eval | serve | bench | bench-data | gpu-check | test | clean"
	@echo "  e.g. make data train serve  (CONFIG=config/... TRAIN_ARGS='--max_iters=100' PORT=8001)"

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Stage 1: the corpus (default: this interpreter's standard library).
data: $(STAMP)
	$(PY) collect_code.py --out $(DATA_DIR) $(ROOTS)

$(DATA_DIR)/meta.json: | $(STAMP)
	$(PY) collect_code.py --out $(DATA_DIR) $(ROOTS)

# Stages 2-3: train (python, or torchrun for several processes: see README).
train: $(DATA_DIR)/meta.json $(STAMP)
	$(PY) train.py $(CONFIG) --dataset=$(DATASET) --out_dir=$(OUT_DIR) $(TRAIN_ARGS)

$(OUT_DIR)/best.pt: | $(DATA_DIR)/meta.json $(STAMP)
	$(PY) train.py $(CONFIG) --dataset=$(DATASET) --out_dir=$(OUT_DIR) $(TRAIN_ARGS)

plot: $(STAMP)
	$(PY) train.py $(CONFIG) --out_dir=$(OUT_DIR) --plot_only=True

# Stage 4: INT8 weights (CPU and CUDA from one file) and the evaluation of both side by side.
INT8_PATH ?= $(OUT_DIR)/ckpt_int8.pt
quantize: $(STAMP) | $(OUT_DIR)/best.pt
	$(PY) quantize_model.py --ckpt $(OUT_DIR)/best.pt --out $(INT8_PATH)

eval: $(STAMP) | $(OUT_DIR)/best.pt
	$(PY) evaluate.py --ckpt $(OUT_DIR)/best.pt $$(test -f $(INT8_PATH) && echo --compare $(INT8_PATH)) $(EVAL_ARGS)

# Stage 5: serve the best checkpoint on :8000 (HOST, PORT, MAX_BATCH, API_KEYS... from the
# environment). No dependency on the checkpoint: a missing one prints which make target to run.
MODEL_PATH ?= $(OUT_DIR)/best.pt
SERVE_ARGS ?=
serve: $(STAMP)
	$(PY) serve_api.py --model $(MODEL_PATH) $(SERVE_ARGS)

# Load test: engine vs the one-at-a-time baseline, side by side (bench/results-*.json, *.png).
BENCH_ARGS ?=
bench: $(STAMP) | $(OUT_DIR)/best.pt
	$(PY) bench_serve.py --ckpt $(MODEL_PATH) --data-dir $(DATA_DIR) $(BENCH_ARGS)

# Prefix caching on vs off, the editor (typing) workload.
bench-prefix-cache: $(STAMP) | $(OUT_DIR)/best.pt
	$(PY) bench_serve.py --ckpt $(MODEL_PATH) --data-dir $(DATA_DIR) --workload typing --levels 32,128 --compare prefix-cache $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(TEST_ARGS) tests/

clean:
	rm -rf $(VENV) .pytest_cache

bench-data: $(STAMP)
	$(PY) bench_data.py

# Every GPU measurement in one call (bench/gpu-<gpu>-<time>.json). It runs on a GPU machine's
# own Python (torch with CUDA, transformers), not the CPU virtualenv: PYTHON=... to pick one.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) gpu_check.py --data-dir $(DATA_DIR) $(GPU_CHECK_ARGS)

# ---- production files, checked by the real tools (CI runs all three)
# Offline static checks: k8s schemas (strict, 1.25-1.37), kustomize, CRDs, promtool, hadolint.
validate-k8s:
	bash scripts/validate_k8s.sh

# A real server + a real Prometheus on loopback: every dashboard query and alert expression.
monitoring-e2e: $(STAMP)
	PYTHON=$(PY) bash scripts/monitoring_e2e.sh

# Build the image offline with podman and smoke-test it (/health, /ready, a completion, SIGTERM).
container-smoke: $(STAMP)
	PYTHON=$(PY) bash scripts/container_smoke.sh

deploy-checks: validate-k8s monitoring-e2e container-smoke
