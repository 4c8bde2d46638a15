"""The decode step's Triton attention (ops/decode_attention.py) against the reference, on CPU through Triton's
interpreter: each row attends only its slots lo..hi, and greedy decoding through it gives the reference's tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")


def run(script: str, interpret: bool = True) -> str:
    """The last line `script` prints, run in a fresh Python: with Triton's interpreter (the kernels run on CPU
    tensors and the decode step attends through them) or without (the masked reference)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def test_kernel_equals_masked_reference():
    out = run("""
        import torch
        from tunesmith.model.decoder import decode_attention
        from tunesmith.ops import decode_attention as da

        torch.manual_seed(0)
        worst = {}
        # (rows, query heads, KV heads, head_dim, slots): Qwen2.5-7B's grouping (7 query heads per KV head) and
        # SmolLM2's (3 per KV head, head_dim 64); slot counts that are and are not multiples of a block
        for B, H, n_kv, hd, L in [(4, 28, 4, 128, 300), (3, 9, 3, 64, 128)]:
            for dtype in (torch.float32, torch.bfloat16):
                q = torch.randn(B, 1, H, hd, dtype=dtype).transpose(1, 2)  # the decoder's (B, H, 1, hd) view
                k, v = torch.randn(2, B, n_kv, L, hd, dtype=dtype)
                hi = torch.tensor([L - 1, 0, L // 2, L - 2][:B])  # row 0 parked on the scratch slot
                lo = torch.where(hi == L - 1, hi, 0)
                lo[-1], hi[-1] = (L - 10, L - 2) if B == 4 else (70, 69)  # a window; an empty span
                slots = torch.arange(L)
                mask = ((slots >= lo[:, None]) & (slots <= hi[:, None]))[:, None, None, :]
                ref = decode_attention(q.double(), k.double(), v.double(), mask).float()
                if B == 3:
                    ref[-1] = 0  # nothing to attend: zeros
                for splits in (1, 3, 8):
                    got = da.attend(q, k, v, da.SlotRange(lo, hi), splits=splits).float()
                    key = f"{dtype} hd{hd}"
                    worst[key] = max(worst.get(key, 0), (got - ref).abs().max().item())
        print(worst)
    """)
    worst = eval(out, {"torch": torch})
    for key, err in worst.items():
        assert err < (1e-5 if "float32" in key else 2e-2), (key, err)  # bf16: its own rounding of the output


def test_greedy_decoding_through_the_kernel_equals_the_reference(qwen_tiny_dir):
    """Continuous batching (rows joining at different steps, a free row parked on the scratch slot) on the tiny
    Qwen2.5-shaped model: the same greedy tokens with the kernel (interpreted) as with the masked reference."""
    script = f"""
        import json
        from tunesmith.generate import DecodeSlots, Generator, SamplingConfig
        from tunesmith.model.load import load_model

        gen = Generator(load_model({str(qwen_tiny_dir)!r}), compiled=True)
        slots = DecodeSlots(gen, rows=3, max_len=96)  # 2 blocks of 64 slots: rows cross a block boundary
        cfg = SamplingConfig(max_new_tokens=14, temperature=0, min_new_tokens=14)
        prompts = {{"a": list(range(100, 150)), "b": list(range(7, 62))}}
        got = {{k: [] for k in prompts}}
        slots.join("a", prompts["a"], cfg, token_sink=got["a"])
        for _ in range(3):
            slots.step()
        slots.join("b", prompts["b"], cfg, token_sink=got["b"])
        while slots.active:
            slots.step()
        print(json.dumps(got))
    """
    want, got = json.loads(run(script, interpret=False)), json.loads(run(script))
    assert got == want and len(got["a"]) == len(got["b"]) == 14
