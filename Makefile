# Fresh machine: `make demo` or `make test`. Both create .venv, install torch ($(TORCH_SPEC)),
# the core and every package under plugins/ and examples/ (editable), then run.
# Everything but torch is installed at the versions in $(LOCK) (pip constraints; `make lock` refreshes
# them, docs/dependencies.md says how). TORCH_SPEC is one requirement, optionally followed by pip
# options: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK ?= constraints.txt
LOCK_VENV ?= $(or $(TMPDIR),/tmp)/peft-kernel-lock-venv
PYTEST_ARGS ?=
# plugins/_template is a skeleton to copy, not a plugin to install (it would register a TEMPLATE method)
PYPROJECTS := $(filter-out plugins/_%,$(wildcard plugins/*/pyproject.toml examples/*/pyproject.toml))
PACKAGES := $(sort $(dir $(PYPROJECTS)))
EDITABLES := -e ".[test]" $(foreach p,$(PACKAGES),-e ./$(p))
STAMP := $(VENV)/.installed
# the requirement quoted (a `>=` must not become a shell redirect), the pip options after it as they are
TORCH_INSTALL := "$(firstword $(TORCH_SPEC))" $(wordlist 2,$(words $(TORCH_SPEC)),$(TORCH_SPEC))
PIP = $(VENV)/bin/python -m pip install -q --disable-pip-version-check

.PHONY: setup demo lint test bench lock clean

# torch first, without its dependencies; then the constraints that apply to that torch (the whole lock
# for the locked release, else the lock less torch's own requirements: tools/lock.py); then, under
# them, torch's dependencies with setuptools (the editable builds below use it, without isolation),
# and everything else.
$(STAMP): pyproject.toml $(LOCK) tools/lock.py $(PYPROJECTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-deps $(TORCH_INSTALL)
	$(VENV)/bin/python tools/lock.py constraints $(LOCK) --output $(VENV)/constraints.txt
	$(PIP) -c $(VENV)/constraints.txt "setuptools>=77" torch
	$(PIP) -c $(VENV)/constraints.txt --no-build-isolation $(EDITABLES)
	$(VENV)/bin/python -m pip check
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/peft-kernel demo

# ruff (pinned in the lock) before the tests: CI runs both through `make test`
lint: setup
	$(VENV)/bin/ruff check .

test: lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS)

bench: setup
	$(PIP) -c $(VENV)/constraints.txt --no-build-isolation -e ".[bench]"
	$(VENV)/bin/python -m benchmarks

# A fresh venv with the newest releases the packages' ranges allow (torch from TORCH_SPEC), frozen
# into $(LOCK). Run `make clean test` afterwards and commit the lock only when it passes.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --disable-pip-version-check $(TORCH_INSTALL) "setuptools>=77"
	$(LOCK_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation \
		-e ".[test,bench]" $(foreach p,$(PACKAGES),-e ./$(p))
	$(LOCK_VENV)/bin/python -m pip check
	$(LOCK_VENV)/bin/python tools/lock.py freeze --output $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "$(LOCK) rewritten; now: make clean test"

clean:
	rm -rf $(VENV) $(LOCK_VENV) .nox bench-results demo-output
