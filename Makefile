# ektp-monitor: `make test` and `make demo` work on a fresh Debian/Ubuntu machine with Python 3.11+.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# command:package pairs needed from the system (tests start their own daemons on loopback)
SYSTEM_DEPS := mosquitto:mosquitto promtool:prometheus prometheus:prometheus ping:iputils-ping \
	dummy-ups:nut-server upsd:nut-server amtool:prometheus-alertmanager faketime:faketime \
	systemd-analyze:systemd mosquitto_passwd:mosquitto \
	prometheus-node-exporter:prometheus-node-exporter prometheus-mqtt-exporter:prometheus-mqtt-exporter
PYTEST_ARGS ?=

.PHONY: test demo deps sysdeps venv clean reliability-report bench

test: deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Runs the fault, hostile-input and security tests and writes docs/reliability.md from their results.
RELIABILITY_TESTS := tests/test_reliability.py tests/test_hostile.py tests/test_mosquitto_acl.py tests/test_tls.py \
	tests/test_collector_web.py tests/test_collector.py::test_identity_mismatch_refused_and_counted \
	tests/test_config.py::test_password_read_and_world_readable_warned
reliability-report: deps
	@mkdir -p build
	rm -f build/reliability.jsonl
	EKTP_FIGURES=$(CURDIR)/build/reliability.jsonl $(BIN)/python -m pytest -q -p no:cacheprovider \
	  --junitxml=build/reliability.xml $(RELIABILITY_TESTS) || true
	$(BIN)/python bench/reliability_report.py build/reliability.xml build/reliability.jsonl > docs/reliability.md
	@echo "wrote docs/reliability.md"

# Benchmarks next to the peers (about 25 minutes on 2 cores); writes bench/results/latest.{json,md}.
bench: deps
	$(BIN)/python -m bench.run

demo: deps
	$(BIN)/python -m collector demo

deps: sysdeps venv

# Installs what is missing with apt-get when root; otherwise prints the command and fails.
sysdeps:
	@missing=""; \
	for pair in $(SYSTEM_DEPS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || [ -x /usr/bin/$$cmd ] || \
	    [ -x /lib/nut/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	missing=$$(printf '%s\n' $$missing | sort -u | tr '\n' ' '); \
	if [ -n "$${missing// /}" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "missing system packages; run: sudo apt-get install -y $$missing" >&2; exit 1; \
	  fi; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    rm -rf $(VENV); \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	    else \
	      echo "python venv is missing; run: sudo apt-get install -y python3-venv" >&2; exit 1; \
	    fi; }; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
