# Two entry points (see README): `make pipeline` and `make test`; `make docs` builds the manual.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: a CPU wheel on machines that have one locally; a bare `torch`
# requirement on an empty venv would pull the multi-GB CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python (the `export` extra) compiles llama.cpp: portable CPU code, built once per machine
# (pip keeps the wheel in its cache).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: venv test lint deps docs pipeline compare bench bench-quick clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" || $(BIN)/pip install -q torch
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e ".[dev,data,eval,export,serve,docs]"
	# the book's reference model, a peer in benchmarks and their tests; its own deps are heavy and unneeded
	$(BIN)/pip install -q --no-deps llms-from-scratch
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check llmcore stages tools tests benchmarks
	$(BIN)/ruff format --check llmcore stages tools tests benchmarks

# dvc.yaml's code deps (each stage's import closure) and params (the keys its loader reads), regenerated in place.
# tests/test_deps.py fails naming the stage and file when they drift; this is the fix.
deps: venv
	$(BIN)/python -m tools.deps --write

# The manual (docs/, mkdocs.yml) as a site in site/: offline, warnings as errors (tests/test_docs.py builds it too).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# pytest exits 5 when nothing was collected; treat that as a failure too.
test: venv lint
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

# The whole pipeline (`dvc repro`). Offline: LLMCORE_MIRROR=../shared/data/mirror make pipeline
pipeline: venv
	. $(BIN)/activate && dvc repro

# DVC experiments side by side (reports/compare.html, .md): `dvc exp run -n NAME -S key=value` makes them
compare: venv
	$(BIN)/llmcore compare

bench: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.bench
	$(BIN)/python -m benchmarks.dpo
	$(BIN)/python -m benchmarks.gguf_export
	$(BIN)/python -m benchmarks.serve_bench
	$(BIN)/python -m benchmarks.structured_bench
	$(BIN)/python -m benchmarks.compiled_decode
	$(BIN)/python -m benchmarks.data
	$(BIN)/python -m benchmarks.harness
	$(BIN)/python -m benchmarks.busy

bench-quick: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.bench --quick
	$(BIN)/python -m benchmarks.dpo --quick
	$(BIN)/python -m benchmarks.gguf_export --quick
	$(BIN)/python -m benchmarks.serve_bench --quick --out reports/serve_bench_quick.json
	$(BIN)/python -m benchmarks.structured_bench --quick --out reports/structured_bench_quick.json
	$(BIN)/python -m benchmarks.compiled_decode --quick --out reports/compiled_decode_quick.json
	$(BIN)/python -m benchmarks.data --quick
	$(BIN)/python -m benchmarks.harness --quick
	$(BIN)/python -m benchmarks.busy --quick --out reports/busy_bench_quick.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
