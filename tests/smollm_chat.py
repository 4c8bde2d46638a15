"""What the tests of generation (test_generate.py) and of `tunesmith infer` (test_infer.py) share: the bundled
SmolLM2's name, a greedy config, a one-message chat, and a LoRA checkpoint as `tunesmith sft` writes one. The two
fixtures here (`one_thread`, `adapted`) act in a test module that imports them, once per module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import load_model
from tunesmith.model.lora import LoraConfig, apply_lora, lora_modules, save_adapter

SMOLLM = "smollm2-135m-instruct"
SYSTEM = "You are a helpful assistant."
QUESTION = "Who are you?"


# One OpenMP thread: with other jobs busy on this 2-core machine, two threads per op spin against each other and
# one decode step took 1.9 s instead of 0.056 s (measured). Subprocesses get the same through OMP_NUM_THREADS.
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def greedy(n: int, **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0.0, **kw)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def lora_checkpoint(lm, ckpt: Path, seed: int) -> None:
    """A LoRA checkpoint as `tunesmith sft` writes one: PEFT files + args.json naming base and system."""
    # A's init draws from torch's global generator: seed it, so the adapter (and whether it changes an answer)
    # does not depend on which tests ran before in the process
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        apply_lora(lm.model, LoraConfig(r=8, alpha=32, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(lm.model):  # B starts at zero; random B makes the adapter change answers
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    ckpt.mkdir(parents=True)
    save_adapter(lm.model, ckpt, LoraConfig(r=8, alpha=32, dropout=0.0), str(lm.path))
    (ckpt / "args.json").write_text(json.dumps({"model": str(lm.path), "system": SYSTEM, "train_type": "lora",
                                                "template": None, "lora_rank": 8, "lora_alpha": 32}))


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(checkpoint folder, our own SmolLM2 copy with that adapter active)."""
    lm = load_model(SMOLLM)
    ckpt = tmp_path_factory.mktemp("run") / "v0-20250101-000000" / "checkpoint-10"
    lora_checkpoint(lm, ckpt, seed=0)
    return ckpt, lm
