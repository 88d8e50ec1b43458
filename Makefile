# Every target works from a fresh clone: the virtualenv is created on demand.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH ?=

.PHONY: venv protos test lint run bench clean check-protos

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

protos: venv
	$(BIN)/python -m framework protos

check-protos: protos
	@git diff --exit-code --stat -- gen || (echo "gen/ is stale: run 'make protos' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- gen)" || (git status --porcelain -- gen && echo "gen/ has untracked files" && exit 1)

test: protos
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check framework services tests
	$(BIN)/ruff format --check framework services tests
	$(BIN)/mypy

run: protos
	$(BIN)/python -m services.demo

bench: protos
	$(BIN)/python -m tests.bench $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
