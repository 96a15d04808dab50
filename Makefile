# The two commands of the README: `make run` and `make test`. Both bootstrap from a fresh
# machine: a virtual environment in .venv with the pinned versions of requirements.lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench system-deps clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# System packages the tests need (installed only when running as root, e.g. in CI).
SYSTEM_PACKAGES := socat mbpoll influxdb victoria-metrics openssl postgresql
system-deps:
	@if [ -n "$(SYSTEM_PACKAGES)" ] && [ "$$(id -u)" = "0" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	fi

run: $(STAMP)
	$(VENV)/bin/tempering run

test: $(STAMP) system-deps
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.scan
	$(PY) -m bench.control
	$(PY) -m bench.modbus
	$(PY) -m bench.historian

clean:
	rm -rf $(VENV) var
