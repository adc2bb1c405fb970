# Two entry points: `make run` (the local CT loop on the bundled sample data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: setup run test lint compile bench demo clean

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/ctloop sample-data --if-missing
	$(BIN)/ctloop run

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

compile: setup
	$(BIN)/ctloop compile --out build/pipelines

bench: setup
	$(BIN)/python -m bench

demo: setup
	$(BIN)/ctloop demo

clean:
	rm -rf $(VENV) .ctloop build
