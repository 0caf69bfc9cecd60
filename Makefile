# edgevm: `make run` starts a node in the foreground; `make test` runs every test. Both set up what is missing.
SHELL := /bin/bash
VENV := .venv/bin
STATE_DIR ?= $(CURDIR)/.state
PYTEST_ARGS ?=

.PHONY: bootstrap run test lint bench guest clean

bootstrap:
	@deploy/bootstrap.sh

run: bootstrap
	$(VENV)/edgevm node up --state-dir $(STATE_DIR)

lint: bootstrap
	$(VENV)/ruff check shared services cli tests
	$(VENV)/mypy shared/src/edgevm/shared
	$(VENV)/lint-imports

test: lint
	$(VENV)/pytest -ra $(PYTEST_ARGS)

bench: bootstrap
	$(VENV)/python tests/bench/run.py

guest: bootstrap
	$(VENV)/python tests/guest/build.py

clean:
	rm -rf .state .pytest_cache .mypy_cache .ruff_cache
