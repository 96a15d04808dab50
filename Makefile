# The two commands of the README: `make run` and `make test`. Both bootstrap from a fresh
# machine: a virtual environment in .venv with the pinned versions of requirements.lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench system-deps js-deps clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# System packages the tests need (installed only when running as root, e.g. in CI). nodejs and
# npm only where npm is missing: a NodeSource nodejs brings its own npm and conflicts with Debian's.
JS_SYSTEM_PACKAGES := $(if $(shell command -v npm),,nodejs npm)
SYSTEM_PACKAGES := socat mbpoll influxdb victoria-metrics prometheus openssl postgresql $(JS_SYSTEM_PACKAGES)
system-deps:
	@if [ -n "$(SYSTEM_PACKAGES)" ] && [ "$$(id -u)" = "0" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	fi

# JavaScript packages the tests need (node-opcua: an OPC UA stack independent of asyncua), pinned,
# in .npm-tools; reinstalled whenever this list changes. node-opcua needs Node.js >= 20.11
# (import.meta.dirname): where the system's is older (Debian 12 ships 18), a pinned Node.js
# from the npm registry goes in too, and the tests run .npm-tools/node_modules/.bin/node.
NPM_DIR := .npm-tools
JS_PACKAGES := node-opcua-address-space@2.186.4 node-opcua-nodesets@2.185.0 node-opcua-client@2.186.4
JS_NODE := node@22.23.3
js-deps: system-deps
	@want="$(JS_PACKAGES)"; \
	node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 11) ? 0 : 1)' \
		|| want="$$want $(JS_NODE)"; \
	if [ "$$(cat $(NPM_DIR)/.installed 2>/dev/null)" != "$$want" ]; then \
		mkdir -p $(NPM_DIR) && \
		npm install --prefix $(NPM_DIR) --no-audit --no-fund --save-exact --loglevel=error $$want && \
		echo "$$want" > $(NPM_DIR)/.installed; \
	fi

run: $(STAMP)
	$(VENV)/bin/tempering run

test: $(STAMP) system-deps js-deps
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.scan
	$(PY) -m bench.control
	$(PY) -m bench.control --family
	$(PY) -m bench.modbus
	$(PY) -m bench.historian
	$(PY) -m bench.opcua
	$(PY) -m bench.isolation
	$(PY) -m bench.alarms
	$(PY) -m bench.batches

clean:
	rm -rf $(VENV) var
