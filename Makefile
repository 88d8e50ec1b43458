# Every target works from a fresh clone: the virtualenv is created on demand. The install
# says what it does and stays quiet otherwise (setuptools' editable-mode notice is a
# UserWarning of the build backend, silenced for that one command).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
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

.PHONY: venv protos test lint run demo bench clean check-protos buf grpcweb grpcjs gateway-fuzz docs check-docs analysis check-analysis chaos fuzz

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@echo "make: installing the framework and its dev tools into $(VENV) (pip, a few minutes the first time)"
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install --quiet --progress-bar off -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
