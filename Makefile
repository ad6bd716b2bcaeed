# Fresh machine: `make demo` or `make test`. Both create .venv, install torch ($(TORCH_SPEC)),
# the core and every package under plugins/ and examples/ (editable), then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PACKAGES := $(sort $(dir $(wildcard plugins/*/pyproject.toml examples/*/pyproject.toml)))
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml examples/*/pyproject.toml)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "setuptools>=70"
	$(VENV)/bin/python -m pip install -q --no-build-isolation -e ".[test]" $(foreach p,$(PACKAGES),-e ./$(p))
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/peft-kernel demo

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python -m pip install -q -e ".[bench]"
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) .nox bench-results demo-output
