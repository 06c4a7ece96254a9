# Falaj: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf
SDK_TS := sdk-ts/node_modules/.bin/protoc-gen-es

.PHONY: setup demo test test-postgres lint proto bench clean

$(STAMP): requirements.lock pyproject.toml sdk/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e sdk -e .
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(SDK_TS): sdk-ts/package.json sdk-ts/package-lock.json
	cd sdk-ts && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/falaj demo

test: setup $(BUF) $(SDK_TS)
	$(PY) -m pytest

# The suite again with every component's store on PostgreSQL and features' online store on
# Redis (tests/backends.py): needs FALAJ_TEST_POSTGRES_URL and FALAJ_TEST_REDIS_URL.
# The slow fault and load tests (about 6 minutes) run in the SQLite pass only, to keep CI
# inside 20 minutes; `make test-postgres PYTEST_ARGS=` runs them on PostgreSQL too.
PYTEST_ARGS ?= -m "not slow"
test-postgres: setup $(BUF) $(SDK_TS)
	FALAJ_TEST_BACKEND=postgres $(PY) -m pytest $(PYTEST_ARGS)

lint: setup $(BUF) $(SDK_TS)
	$(VENV)/bin/ruff check src sdk/src/falaj/sdk tests scripts
	$(VENV)/bin/ruff format --check src sdk/src/falaj/sdk tests scripts
	$(VENV)/bin/mypy
	cd proto && ../$(BUF) lint
	$(PY) scripts/gen_proto.py --check
	cd sdk-ts && node_modules/.bin/tsc --noEmit -p .

proto: setup $(BUF) $(SDK_TS)
	cd proto && ../$(BUF) lint
	$(PY) scripts/gen_proto.py
	cd proto && ../$(BUF) generate --template buf.gen.ts.yaml

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) node_modules sdk-ts/node_modules .falaj .bench .pytest_cache .mypy_cache .ruff_cache
