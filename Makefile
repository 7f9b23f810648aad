# Tessera: `make run` (the whole stack, demo upstream included) and `make test` (every tier).
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

# The e2e tier once more with ext_authz over HTTP/1.1 (`tessera up --authz-transport http`).
# Not repeated: PostgreSQL runs (the transport does not touch the store) and the one test that
# speaks gRPC Check to the ext_authz replicas itself.
E2E_HTTP := TESSERA_TEST_AUTHZ_TRANSPORT=http $(BIN)/pytest tests/e2e -m "envoy and not real and not postgres" \
	--deselect tests/e2e/test_auth.py::test_revocation_reaches_every_replica_and_worker_within_a_second

.PHONY: install tools run test lint check-generated unit integration e2e e2e-http bench clean llm

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e '.[postgres]' --group dev
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install Tessera (produces .venv/bin/tessera)

tools:  ## Debian's prometheus: promtool tests the alert rules, a real Prometheus scrapes a stack
	@command -v promtool >/dev/null || apt-get install -y --no-install-recommends prometheus \
		|| (apt-get update && apt-get install -y --no-install-recommends prometheus)

run: install $(if $(REAL),llm)  ## the whole stack with the demo upstream on 127.0.0.1:8080 (REAL=1: and a real model)
	$(BIN)/tessera up --demo-upstream $(if $(REAL),--real-model) $(ARGS)

lint: install  ## ruff, mypy, import contracts, generated-code drift
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports
	$(BIN)/python -m tessera.codegen --check

test: lint tools  ## every tier: unit, contract (memory/Redis, SQLite/PostgreSQL), integration, e2e through real Envoy (ext_authz over gRPC, then HTTP)
	$(BIN)/pytest $(PYTEST_ARGS)
	$(E2E_HTTP) $(PYTEST_ARGS)

unit: install tools
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

e2e: install tools
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

e2e-http: install tools  ## the e2e tier with ext_authz over HTTP/1.1
	$(E2E_HTTP) $(PYTEST_ARGS)

llm: install  ## build llama-server and Gemma 3 270M once, into ~/.cache/tessera/llm (first time ~4 min)
	$(BIN)/python -m tessera.llm build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

bench: install  ## load through upstream / plain Envoy / callout floor / Tessera, ext_authz at 1k+1M keys, the tracer's cost (~8 min)
	@command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	@command -v h2load >/dev/null || apt-get install -y nghttp2-client || (apt-get update && apt-get install -y nghttp2-client)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.tracing_cost

.PHONY: image
image:  ## the container image localhost/tessera:<version> from Debian packages (debootstrap, podman; root), then a smoke run (docs/image.md)
	bash image/build.sh
