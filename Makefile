# The two commands of the README, each setting itself up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
SOCKET ?= /tmp/zeusd.sock

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	@# Left by older set-ups: setuptools metadata in the checkout, and the deprecated pynvml shim.
	rm -rf zeusd.egg-info
	$(VENV)/bin/pip uninstall -q -y pynvml 2>/dev/null || true
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# CI-only switches come from the environment (.ci/run sets them); a developer's `make test` runs without them:
#   ZEUSD_COVERAGE=1            run the suite under coverage (daemon subprocesses included) and fail below
#                               COVERAGE_FLOOR percent of zeusd/
#   ZEUSD_TEST_STRESS=1         also run the stress-marked tests (deselected by default)
#   ZEUSD_HYPOTHESIS_PROFILE=ci property tests derandomized (tests/conftest.py)
COVERAGE_FLOOR ?= 96
COVERAGE_DIR := $(CURDIR)/build/coverage
export COVERAGE_FILE := $(COVERAGE_DIR)/.coverage
ifeq ($(ZEUSD_COVERAGE),1)
PYTEST = $(VENV)/bin/coverage run -m pytest
else
PYTEST = $(VENV)/bin/pytest
endif

.PHONY: serve test coverage coverage-start coverage-report mutation zeus-clients system-packages bench bench-compare
# The official Zeus clients for tests/test_zeus_compat.py; the script skips a venv that is already right.
zeus-clients:  ## .venv-zeus-0.15 (zeus 0.15.1) and .venv-zeus-0.16 (zeus 0.16.0)
	PYTHON=$(PYTHON) bash tests/zeus_clients/setup_venvs.sh

# Prometheus and Chromium for tests/test_prometheus.py and tests/test_live_page.py: installed with
# apt-get where missing and possible (root); otherwise the script says why and those tests skip.
system-packages:
	bash tests/setup_system_packages.sh

serve: $(VENV)/.installed  ## the daemon on a simulated node, on $(SOCKET)
	$(VENV)/bin/zeusd serve --simulate --socket-path $(SOCKET)

test: $(VENV)/.installed zeus-clients system-packages  ## type checks, then the whole test suite
	$(VENV)/bin/mypy zeusd twisted/plugins/zeusd_plugin.py tests bench
	$(if $(filter 1,$(ZEUSD_COVERAGE)),$(MAKE) --no-print-directory coverage-start)
	ZEUSD_REQUIRE_ZEUS_CLIENTS=1 $(PYTEST) -q
	$(if $(filter 1,$(ZEUSD_TEST_STRESS)),ZEUSD_REQUIRE_ZEUS_CLIENTS=1 $(PYTEST) -q -m stress)
	$(if $(filter 1,$(ZEUSD_COVERAGE)),$(MAKE) --no-print-directory coverage-report FAIL_UNDER=$(COVERAGE_FLOOR))

# The whole suite under coverage, then the combined report of the tests and every daemon they started.
coverage: $(VENV)/.installed zeus-clients system-packages  ## line coverage of zeusd/, daemons included
	$(MAKE) --no-print-directory coverage-start
	-ZEUSD_REQUIRE_ZEUS_CLIENTS=1 $(VENV)/bin/coverage run -m pytest -q
	$(MAKE) --no-print-directory coverage-report

coverage-start:
	rm -rf $(COVERAGE_DIR) && mkdir -p $(COVERAGE_DIR)
	chmod 1777 $(COVERAGE_DIR)  # daemons started as nobody write their data here too

coverage-report:
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report $(if $(FAIL_UNDER),--fail-under=$(FAIL_UNDER))

# Mutation checks of the modules where a wrong answer is silent (docs/testing.md has the scores).
mutation: $(VENV)/.installed  ## mutmut on params, auth, control table, energy bookkeeping, executor, sampling
	bash tests/mutation/run.sh

bench: $(VENV)/.installed  ## benchmarks on the stand-in NVML library; results in bench/results/
	$(VENV)/bin/python bench/run.py

# Upstream zeusd v0.4.0 from crates.io, for the side-by-side benchmark. Built once; delete bench/build/upstream to rebuild.
UPSTREAM_ROOT ?= bench/build/upstream
UPSTREAM_ZEUSD = $(UPSTREAM_ROOT)/bin/zeusd
CARGO ?= $(shell command -v cargo 2>/dev/null || echo $(HOME)/.cargo/bin/cargo)

$(UPSTREAM_ZEUSD):
	@if [ ! -x "$(CARGO)" ]; then \
	  echo "bench-compare: cargo is missing (not on PATH, not at $(CARGO))." >&2; \
	  echo "  It builds upstream zeusd v0.4.0: cargo install zeusd --version 0.4.0 --root $(UPSTREAM_ROOT)" >&2; \
	  echo "  Install Rust (https://rustup.rs) or run: make bench-compare CARGO=/path/to/cargo" >&2; \
	  exit 1; \
	fi
	$(CARGO) install zeusd --version 0.4.0 --root $(UPSTREAM_ROOT)

bench-compare: $(VENV)/.installed $(UPSTREAM_ZEUSD)  ## ours vs upstream zeusd v0.4.0 and the floors; results in bench/results/
	$(VENV)/bin/python bench/compare.py --upstream-binary $(UPSTREAM_ZEUSD)
