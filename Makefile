# labgate: the two commands of the README, and the checks.
#   make run    - set up .venv and start labgate serve on http://127.0.0.1:8000
#   make test   - set up .venv (with the dev extras) and run the whole test suite
#   make check  - ruff (lint + format check) and mypy

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check lint format venv clean sandbox identity-test-deps compile pure

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev,jupyter]"
	touch $(STAMP)

venv: $(STAMP)

# The router's per-request path compiled with mypyc, and its C head scanners
# (docs/router.md#the-compiled-hot-path).
# Without it (no C compiler, or sources edited since) the router runs its Python sources.
NATIVE := src/labgate/router/native/SOURCES.json
$(NATIVE): $(STAMP) $(wildcard src/labgate/router/*.py src/labgate/router/*.c)
	$(BIN)/python scripts/compile-router.py

compile: $(NATIVE)

# Back to the router's Python sources.
pure:
	$(BIN)/python scripts/compile-router.py --remove

run: $(STAMP) sandbox $(NATIVE)
	$(BIN)/labgate serve

# Run as root, labgate refuses to start tools without bubblewrap (they would run as root):
# install it when missing and apt-get can.
sandbox:
	@if ! command -v bwrap >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing bubblewrap, the tools' sandbox (apt-get install bubblewrap)"; \
	  apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
	    || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }; \
	fi

# Two pytest-xdist workers: most tests wait on processes, sockets and the database, so a
# second worker about halves the run on two cores. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

# The tests start many labgate processes (serve, agent, router, tools): with bytecode
# writes off (PYTHONDONTWRITEBYTECODE, as on CI machines) each would compile labgate's
# sources again, seconds apiece. Compiled once here; unchanged files are skipped.
test: $(STAMP) $(NATIVE)
	$(BIN)/python -m compileall -q src >/dev/null
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The OpenID Connect provider the identity tests start (npm's oidc-provider).
identity-test-deps:
	npm ci --prefix tests/identity --no-audit --no-fund --loglevel=error

check: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
