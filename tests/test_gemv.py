"""Batch-1 decoding's matrix-vector kernel (ops/gemv.py) against F.linear, on CPU through Triton's interpreter,
and greedy batch-1 decoding through it (with the slot attention kernel) against the plain path."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # every test runs Triton's interpreter in a fresh Python

from test_decode_attention import run  # noqa: E402


def test_kernel_equals_linear():
    out = run("""
        import torch
        import torch.nn.functional as F
        from tunesmith.ops import gemv, gemv_kernels

        torch.manual_seed(0)
        worst = {}
        # shapes with and without whole tiles; with and without bias; the shipped tile shapes and others
        for N, K in [(64, 1024), (40, 300), (7, 96)]:
            for dtype in (torch.float32, torch.bfloat16):
                w = (torch.randn(N, K) * 0.05).to(dtype)
                x = torch.randn(1, 1, K).to(dtype)
                b = torch.randn(N).to(dtype)
                want = F.linear(x.double(), w.double(), b.double()).float()
                for bias in (b, None):
                    ref = want if bias is not None else want - b.double().float()
                    for tiles in ((4, 512, 4, 1), (8, 128, 4, 1), (1, 64, 2, 1)):
                        got = gemv_kernels.gemv(x, w, bias, *tiles)
                        assert got.shape == (1, 1, N) and got.dtype == dtype
                        key = str(dtype)
                        worst[key] = max(worst.get(key, 0), (got.float() - ref).abs().max().item())
                assert not gemv.usable(x, w)  # gradients wanted: F.linear
                with torch.no_grad():
                    assert gemv.usable(x, w) and not gemv.usable(torch.randn(2, K).to(dtype), w)
        print(worst)
    """)
    worst = eval(out)
    assert worst["torch.float32"] < 1e-5 and worst["torch.bfloat16"] < 3e-2, worst


def test_batch1_greedy_decoding_through_the_kernels_equals_the_plain_path(qwen_tiny_dir):
    """Generator's batch-1 decoding on the tiny Qwen2.5-shaped model (qkv with bias, down projection, every
    product when all roles take the kernel): the same greedy tokens as without the kernels."""
    script = f"""
        import json
        from tunesmith.decode.generator import Generator
        from tunesmith.decode.sampling import SamplingConfig
        from tunesmith.decode.static import Kernels
        from tunesmith.model.load import load_model

        lm = load_model({str(qwen_tiny_dir)!r})
        cfg = SamplingConfig(max_new_tokens=12, temperature=0, min_new_tokens=12)
        out = {{}}
        for roles in ({{"qkv", "down"}}, {{"qkv", "o", "gate_up", "down", "lm_head"}}):
            gen = Generator(lm, compiled=True, kernels=Kernels(gemv_roles=frozenset(roles)))
            out[len(roles)] = gen.complete(list(range(100, 140)), cfg).token_ids
        print(json.dumps(out))
    """
    want, got = json.loads(run(script, interpret=False)), json.loads(run(script))
    assert got == want and len(got["2"]) == 12, (got, want)
