# The two commands of the README, each setting itself up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
SOCKET ?= /tmp/zeusd.sock

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

.PHONY: serve test
serve: $(VENV)/.installed  ## the daemon on a simulated node, on $(SOCKET)
	$(VENV)/bin/zeusd serve --simulate --socket-path $(SOCKET)

test: $(VENV)/.installed  ## type checks, then the whole test suite
	$(VENV)/bin/mypy zeusd twisted/plugins/zeusd_plugin.py
	$(VENV)/bin/pytest -q
