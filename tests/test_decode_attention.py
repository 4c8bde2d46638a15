"""The decode step's Triton kernels against their references, on CPU through Triton's interpreter: attention
(ops/decode_attention.py: each row attends only its slots lo..hi), the rotation + cache write (ops/rope_write.py),
and greedy decoding through both gives the reference's tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # every test runs Triton's interpreter in a fresh Python


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
        from tunesmith.decode.static import decode_attention
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
                # lo None (the decode step's spans): from slot 0, a row on the scratch slot reading it alone
                step_lo = torch.where(hi == L - 1, hi, 0)
                assert torch.equal(da.attend(q, k, v, da.SlotRange(None, hi), splits=3),
                                   da.attend(q, k, v, da.SlotRange(step_lo, hi), splits=3))
                assert not torch.equal(step_lo, lo)  # the explicit spans above differ: lo is really worked out
        print(worst)
    """)
    worst = eval(out, {"torch": torch})
    for key, err in worst.items():
        assert err < (1e-5 if "float32" in key else 2e-2), (key, err)  # bf16: its own rounding of the output


def test_rope_write_equals_rotation_and_cache_update():
    """One program per (row, head): q rotated as Attention rotates it, k rotated and v written into each row's own
    slot of the static cache (a row on the scratch slot too), and no other slot touched."""
    out = run("""
        import torch
        from tunesmith.model.decoder import rotate_half
        from tunesmith.ops import rope_write

        torch.manual_seed(0)
        worst = {}
        for B, H, n_kv, hd, L in [(3, 28, 4, 128, 40), (2, 9, 3, 64, 17)]:
            for dtype in (torch.float32, torch.bfloat16):
                qkv = torch.randn(B, 1, (H + 2 * n_kv) * hd, dtype=dtype)  # the fused product's output
                q, k, v = (t.view(B, 1, -1, hd) for t in qkv.split([H * hd, n_kv * hd, n_kv * hd], -1))
                pos = torch.tensor([[5], [L - 1], [0]][:B])  # row 1 parked on the scratch slot
                ang = pos[..., None].float() * torch.rand(hd // 2) * 3
                cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
                caches = [torch.randn(B, n_kv, L, hd, dtype=dtype) for _ in range(2)]
                before = [c.clone() for c in caches]
                got = rope_write.rope_write(q, k, v, cos, sin, caches[0], caches[1], pos)
                # the reference in float64: Attention's rotation, then the cache rows written at pos
                c, s_ = cos.double()[:, None], sin.double()[:, None]
                qt, kt = q.double().transpose(1, 2), k.double().transpose(1, 2)
                want_q = qt * c + rotate_half(qt) * s_
                want_k = (kt * c + rotate_half(kt) * s_).to(dtype)
                rows = torch.arange(B)[:, None]
                before[0][rows, :, pos] = want_k.transpose(1, 2)
                before[1][rows, :, pos] = v
                key = f"{dtype} hd{hd}"
                err = max((got.double() - want_q).abs().max().item(),
                          (caches[0].double() - before[0].double()).abs().max().item())
                worst[key] = max(worst.get(key, 0), err)
                assert got.shape == (B, H, 1, hd) and got.dtype == dtype
                assert torch.equal(caches[1], before[1])  # v: copied exactly, nothing else written
                unwritten = torch.ones(B, L, dtype=torch.bool)
                unwritten[rows, pos] = False
                assert torch.equal(caches[0].transpose(1, 2)[unwritten], before[0].transpose(1, 2)[unwritten])
        print(worst)
    """)
    worst = eval(out, {"torch": torch})
    for key, err in worst.items():
        assert err < (1e-5 if "float32" in key else 2e-2), (key, err)  # bf16: one step of the output's rounding


def test_greedy_decoding_through_the_kernel_equals_the_reference(qwen_tiny_dir):
    """Continuous batching (rows joining at different steps, a free row parked on the scratch slot) on the tiny
    Qwen2.5-shaped model: the same greedy tokens with the kernel (interpreted) as with the masked reference."""
    script = f"""
        import json
        from tunesmith.decode.generator import Generator
        from tunesmith.decode.sampling import SamplingConfig
        from tunesmith.decode.slots import DecodeSlots
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
