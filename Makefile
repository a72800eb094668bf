# semdedup-assets: `make demo`, `make test`, `make ui`, `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STORAGE := .demo/storage
UI_PORT ?= 3000

.PHONY: demo test ui bench bench-smoke validate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps: re-install only when pyproject.toml changes (a second `make demo` is fast).
$(VENV)/.stamp-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,demo]'
	touch $@ $(VENV)/.stamp-demo

demo: $(VENV)/.stamp-demo
	$(BIN)/semdedup demo --storage $(DEMO_STORAGE)

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q

validate: $(VENV)/.stamp-demo
	SEMDEDUP_STORAGE=$(DEMO_STORAGE) $(BIN)/dagster definitions validate -w workspace.yaml

ui: $(VENV)/.stamp-demo
	$(BIN)/python -c "from semdedup_assets.pipeline import ensure_instance_config as e; e('$(abspath $(DEMO_STORAGE))/dagster_home')"
	SEMDEDUP_STORAGE=$(abspath $(DEMO_STORAGE)) DAGSTER_HOME=$(abspath $(DEMO_STORAGE))/dagster_home \
		$(BIN)/dagster dev -h 127.0.0.1 -p $(UI_PORT) -w workspace.yaml

bench: $(VENV)/.stamp-test
	$(BIN)/python bench/pairwise_memory.py

clean:
	rm -rf .demo test-artifacts .pytest_cache
