# semdedup-assets: `make demo`, `make test`, `make test-fast`, `make lint`, `make ui`, `make bench`, `make docs`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STORAGE := .demo/storage
UI_PORT ?= 3000

.PHONY: demo test test-fast lint browser-deps server-deps ui bench bench-smoke validate docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps: re-install only when pyproject.toml changes (a second `make demo` is fast).
$(VENV)/.stamp-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo,static]'
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,demo,deploy,ray,static]'
	touch $@ $(VENV)/.stamp-demo

# The demo embeds with the static model (distilled from all-MiniLM-L6-v2 once per machine);
# `make demo DEMO_MODEL=all-MiniLM-L6-v2` runs the transformer itself.
DEMO_MODEL ?= static
demo: $(VENV)/.stamp-demo
	$(BIN)/semdedup demo --storage $(DEMO_STORAGE) --model $(DEMO_MODEL)

# Two pytest-xdist workers (TEST_WORKERS=0: one process); tests are grouped per module and the
# daemon/server tests share one group (semdedup_assets_tests/conftest.py).
TEST_WORKERS ?= 2
test: browser-deps server-deps $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# The fast tier (docs/testing.md): the tests that start no server, daemon, Ray or subprocess.
# conftest.py gives every test its tier and fails a fast-tier test that starts a subprocess.
test-fast: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q --durations=10 -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "pure or dagster"

$(VENV)/.stamp-lint: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[lint]'
	touch $@

# ruff (lint, then format without rewriting) and mypy, as configured in pyproject.toml. `ruff check --fix .`
# and `ruff format .` apply what they can.
lint: $(VENV)/.stamp-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Debian's Chromium for the browser test (Playwright drives /usr/bin/chromium; it never downloads a
# browser). Installs only when missing; as root directly, otherwise through passwordless sudo.
browser-deps:
	@test -x /usr/bin/chromium || { \
		if ! command -v apt-get >/dev/null 2>&1; then echo "browser-deps: no apt-get; install chromium at /usr/bin/chromium yourself" >&2; exit 0; fi; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else echo "browser-deps: not root and no passwordless sudo; skipping the chromium install" >&2; exit 0; fi; \
		echo "browser-deps: installing chromium (apt-get)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	}

# PostgreSQL for the production-stack tests (test_deploy.py starts its own cluster with initdb/pg_ctl;
# moto's S3 server comes with the test extra). Installs only when initdb is missing, like browser-deps.
server-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
		if ! command -v apt-get >/dev/null 2>&1; then echo "server-deps: no apt-get; install PostgreSQL (initdb, pg_ctl) yourself" >&2; exit 0; fi; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else echo "server-deps: not root and no passwordless sudo; skipping the PostgreSQL install" >&2; exit 0; fi; \
		echo "server-deps: installing postgresql (apt-get)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	}

validate: $(VENV)/.stamp-demo
	SEMDEDUP_STORAGE=$(DEMO_STORAGE) VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/dg check defs

# `dg dev` on the demo's storage and run history; SIGINT or SIGTERM stops it and every process
# it started within 10 s (semdedup_assets/ui.py runs it in its own process group).
ui: $(VENV)/.stamp-demo
	$(BIN)/python -m semdedup_assets.ui --storage $(abspath $(DEMO_STORAGE)) --host 127.0.0.1 --port $(UI_PORT)

$(VENV)/.stamp-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,demo,deploy,ray,static,bench]'
	touch $@ $(VENV)/.stamp-test $(VENV)/.stamp-demo

# Full-size benchmarks, one after another (never in parallel: they time the same cores);
# each writes bench/results/<name>.md.
bench: $(VENV)/.stamp-bench
	$(BIN)/python bench/pairwise_memory.py
	$(BIN)/python bench/pairwise.py
	$(BIN)/python bench/kmeans.py
	$(BIN)/python bench/text_embedding.py
	$(BIN)/python bench/end_to_end.py
	$(BIN)/python bench/image_throughput.py
	$(BIN)/python bench/orchestration.py
	$(BIN)/python bench/backfill.py
	$(BIN)/python bench/scale_out.py
	$(BIN)/python bench/library.py
	$(BIN)/python bench/library_semhash.py

# Tiny runs of each benchmark (what CI runs through semdedup_assets_tests/test_bench_smoke.py).
bench-smoke: $(VENV)/.stamp-bench
	$(BIN)/python -m pytest -q semdedup_assets_tests/test_bench_smoke.py

$(VENV)/.stamp-docs: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

# The documentation site in site/: the configuration page is generated from Settings first, then
# MkDocs (Material) builds with --strict, so a broken link, anchor or missing page fails.
docs: $(VENV)/.stamp-docs
	$(BIN)/python docs/gen_config.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf .demo test-artifacts .pytest_cache site
