# Every target works from a fresh clone: the virtualenv is created on demand and installed
# from the lock (requirements/dev.txt) by a pinned uv. The install says what it does and
# stays quiet otherwise.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The lock (every package of the dev install, pinned with hashes, for every platform) and the
# pinned installer that reads it; both written by `make lock`, never by hand (README: Upgrading).
LOCK := requirements/dev.txt
UV := $(BIN)/uv
UV_INSTALL = $(UV) pip install --quiet --python
LOCK_COMPILE = $(UV) pip compile --quiet --universal --generate-hashes --custom-compile-command 'make lock'
# Throwaway virtualenvs: the lowest versions pyproject.toml allows, and the newest ones.
LOWEST := .venv-lowest
NEWEST := .venv-newest
PYTEST_ARGS ?=
BENCH ?=
# buf CLI (lint, breaking): the buf-bin wheel of the dev extras, in the virtualenv.
BUF := $(BIN)/buf
# Real gRPC-Web clients for the gateway's tests (npm, under .tools/grpcweb, git-ignored).
GRPCWEB := .tools/grpcweb/node_modules/@connectrpc/connect-web/package.json
# A foreign gRPC client for the system tests: Node's @grpc/grpc-js (npm, under .tools/grpcjs).
GRPCJS := .tools/grpcjs/node_modules/@grpc/grpc-js/package.json
# What `buf breaking` compares the contracts with: main's committed protos
# (a release tag later: BUF_AGAINST='.git#tag=v1.0.0,subdir=protos').
BUF_AGAINST ?= .git\#branch=main,subdir=protos

.PHONY: venv lock lock-upgrade check-lock lowest-test upgrade-test protos test lint run demo bench clean check-protos buf grpcweb grpcjs gateway-fuzz docs check-docs analysis check-analysis chaos fuzz

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(UV): requirements/uv.txt | $(BIN)/python
	$(BIN)/pip install --quiet --progress-bar off --require-hashes -r requirements/uv.txt
	touch $@

# The locked packages, then the framework itself (editable, built with the locked setuptools).
$(VENV)/.installed: $(UV) pyproject.toml $(LOCK)
	@echo "make: installing $(LOCK) and the framework (editable) into $(VENV)"
	$(UV_INSTALL) $(BIN)/python --require-hashes -r $(LOCK)
	$(UV_INSTALL) $(BIN)/python --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

venv: $(VENV)/.installed

# Re-resolve after an edit of pyproject.toml, keeping every pin the edit does not force to move.
# LOCK_ARGS='--upgrade-package grpcio' moves one package to its newest allowed version.
LOCK_ARGS ?=
lock: $(UV)
	$(LOCK_COMPILE) $(LOCK_ARGS) pyproject.toml --extra dev -o $(LOCK)
	$(LOCK_COMPILE) requirements/uv.in -o requirements/uv.txt

# Everything to the newest versions the ranges allow (then `make venv test`, and commit the lock).
lock-upgrade: $(UV)
	$(LOCK_COMPILE) --upgrade pyproject.toml --extra dev -o $(LOCK)
	$(LOCK_COMPILE) --upgrade requirements/uv.in -o requirements/uv.txt

# CI: the lock is current with pyproject.toml (`make lock` would move no pin; hashes not compared,
# an index may add wheels to a release).
check-lock: $(UV)
	@rm -rf .lockcheck && mkdir .lockcheck && cp $(LOCK) .lockcheck/dev.txt
	@$(LOCK_COMPILE) pyproject.toml --extra dev -o .lockcheck/dev.txt
	@grep '^[a-z]' $(LOCK) > .lockcheck/pins.want; grep '^[a-z]' .lockcheck/dev.txt > .lockcheck/pins.got
	@diff .lockcheck/pins.want .lockcheck/pins.got || (rm -rf .lockcheck; echo "$(LOCK) is stale: run 'make lock' and commit"; exit 1)
	@rm -rf .lockcheck

# The suite on the lowest versions pyproject.toml allows for its direct dependencies (the floors
# are tested: raise one when it fails), in a fresh virtualenv; CI runs it after `make test`.
lowest-test: $(UV) protos
	rm -rf $(LOWEST) && $(PY) -m venv $(LOWEST)
	$(UV_INSTALL) $(LOWEST)/bin/python --resolution lowest-direct -e '.[dev]'
	$(LOWEST)/bin/python -m pip check
	$(LOWEST)/bin/python -m pytest -q $(PYTEST_ARGS)

# The suite on the newest versions the ranges allow, in a fresh virtualenv; the lock is untouched.
# Green: `make lock-upgrade venv test` and commit requirements/.
upgrade-test: $(UV) protos
	rm -rf $(NEWEST) && $(PY) -m venv $(NEWEST)
	$(UV_INSTALL) $(NEWEST)/bin/python --refresh --upgrade -e '.[dev]'
	$(NEWEST)/bin/python -m pip check
	$(NEWEST)/bin/python -m pytest -q $(PYTEST_ARGS)

protos: venv
	$(BIN)/python -m framework protos

check-protos: protos
	@git diff --exit-code --stat -- gen protos/buf || (echo "gen/ is stale: run 'make protos' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- gen protos/buf)" || (git status --porcelain -- gen protos/buf && echo "gen/ or protos/buf/ has untracked files" && exit 1)

test: protos
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check framework services tests
	$(BIN)/ruff format --check framework services tests
	$(BIN)/mypy
	$(BUF) lint protos
	$(BUF) breaking protos --against '$(BUF_AGAINST)'

buf: venv

$(GRPCWEB):
	npm install --prefix .tools/grpcweb --no-audit --no-fund --silent @connectrpc/connect@2.2.0 \
		@connectrpc/connect-web@2.2.0 @bufbuild/protobuf@2.17.0 grpc-web@2.1.1 xhr2@0.2.1

grpcweb: $(GRPCWEB)

# A longer schemathesis run against the gateway than the default suite's.
gateway-fuzz: protos
	SCHEMATHESIS_EXAMPLES=100 SCHEMATHESIS_MAX_TIME_S=900 $(BIN)/python -m pytest -q \
		tests/gateway/test_schemathesis.py

$(GRPCJS):
	npm install --prefix .tools/grpcjs --no-audit --no-fund --silent @grpc/grpc-js@1.14.7 @grpc/proto-loader@0.8.1

grpcjs: $(GRPCJS)

docs: protos
	$(BIN)/python -m framework reference

check-docs: docs
	@git diff --exit-code --stat -- docs/reference.md || (echo "docs/reference.md is stale: run 'make docs' and commit" && exit 1)

# The example system's map from its contracts and code (docs/system.svg, docs/system.mmd),
# and the architecture check CI runs: no dependency cycle, no undeclared call.
ANALYZE := $(BIN)/python -m framework analyze protos --code services --exclude-context testing,operations

analysis: protos
	$(ANALYZE) --graph docs/system.svg --graph docs/system.mmd > /dev/null

check-analysis: analysis
	$(ANALYZE) --fail-on cycle,undeclared
	@git diff --exit-code --stat -- docs/system.svg docs/system.mmd || (echo "docs/system.* are stale: run 'make analysis' and commit" && exit 1)

# The whole example system on embedded defaults (SQLite files in data/, the in-process bus).
# SYSTEM_STORE=postgresql://... and SYSTEM_BUS=nats://... switch engines. Development keys and
# tokens are created in data/keys and data/tokens (said loudly at start): nothing to type.
run: protos
	@echo "make run: DEVELOPMENT keys and tokens in data/ (never for production); Ctrl-C stops everything"
	$(BIN)/python -m framework up system.toml

# The scripted story over HTTP through the gateway, on a throwaway system; exits 0 when both
# saga outcomes (completed, compensated) were seen.
demo: protos
	$(BIN)/python -m services.demo.walkthrough

# Chaos experiments (services/chaos/experiments) against a fresh system, on SQLite and on
# PostgreSQL + NATS JetStream; prints the table, writes chaos-report/<backend>/ (JSON, PNGs).
CHAOS_PG ?= postgresql://postgres@127.0.0.1:5432/test
CHAOS_NATS ?= nats://127.0.0.1:4222
chaos: protos
	$(BIN)/python -m framework chaos run services/chaos/experiments --store sqlite --bus store --report chaos-report/sqlite
	$(BIN)/python -m framework chaos run services/chaos/experiments --store $(CHAOS_PG) --bus $(CHAOS_NATS) --report chaos-report/postgres

# The fuzzers of the default suite, longer (random seed each run).
fuzz: protos
	FUZZ_EXAMPLES=2000 FUZZ_RANDOM=1 $(BIN)/python -m pytest -q tests/chaos/test_fuzz.py

bench: protos
	$(BIN)/python -m tests.bench $(BENCH)

clean:
	rm -rf $(VENV) $(LOWEST) $(NEWEST) .pytest_cache .mypy_cache .ruff_cache
