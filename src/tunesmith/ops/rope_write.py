"""The decode step's rotary embedding and KV-cache write in one kernel (Triton).

Decoding one token per row, each layer rotates q and k by the row's position and writes k and v into the row's
slot of the static cache. Inductor compiled that as five small kernels a layer (q's rotation, k's rotation with its
cache write, v's cache write, and two that recompute cos/sin): 0.18 of a 3.97 ms batch-1 step of Qwen2.5-7B on
the H200 (bench/infer.py --parts steps, 2026-12-01), each a few hundred bytes of work and a launch. Here
one program per (row, head) loads its head once, rotates it in fp32 with the step's cos/sin and stores it: q heads
to the output, k heads (and the v head beside them) into the cache at the row's position: step 4.219 -> 4.095 ms,
396 -> 354 kernels (bench/infer.py --parts steps --variants kernels 'rope by inductor', A/B in one process,
2026-12-01). Used where the slot attention kernel is (ops/decode_attention.usable: compiled CUDA steps, or
Triton's interpreter in the tests).
"""

from __future__ import annotations

from tunesmith.ops.launch import INTERPRETING

_kernels = None


def load_kernels() -> bool:
    """Import the kernel (outside compiled code); False without triton."""
    global _kernels
    if _kernels is None:
        try:
            from tunesmith.ops import rope_write_kernels
        except ImportError:
            return False
        _kernels = rope_write_kernels
    return True


def rope_write(q, k, v, cos, sin, k_cache, v_cache, pos, pdl: bool = False):
    """q (B, 1, H, hd), k/v (B, 1, n_kv, hd) (views of the fused q/k/v product; last dim contiguous), cos/sin
    (B, 1, hd), caches (B, n_kv, L, hd), pos (B, 1) -> rotated q as (B, H, 1, hd); rotated k and v are written to
    cache slot pos[b] of each row (the reference: the rotation, then StaticKVCache.update)."""
    return _kernels.rope_write(q, k, v, cos, sin, k_cache, v_cache, pos, pdl)


def available() -> bool:
    """Whether the kernel is loaded (decode steps that attend through ops/decode_attention's kernel use it)."""
    return _kernels is not None


if INTERPRETING:  # tests: every decode step through the kernels rotates and writes through this one
    load_kernels()
