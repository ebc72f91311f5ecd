# The two set-up commands (README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use and reinstall it when pyproject.toml changes.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean-venv

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ultrafedfm demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "" $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow and not e2e" $(PYTEST_ARGS)

bench: $(STAMP)
	for b in bench/bench_*.py; do $(VENV)/bin/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
