# Two entry points (see README): `make speedrun` and `make test`. Both bootstrap .venv themselves.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup assets speedrun test lint

setup:
	./scripts/bootstrap.sh

assets: setup
	$(BIN)/lutq assets fetch

speedrun: assets
	$(BIN)/lutq speedrun

test: assets
	$(BIN)/python -m ruff check src tests
	$(BIN)/python -m ruff format --check src tests
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/python -m ruff check src tests
	$(BIN)/python -m ruff format --check src tests
