"""The Triton kernel of ops/rope_write.py (imported on first use, as the other decode kernels are)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunesmith.ops.launch import launch_options


@triton.jit
def _rope_write(Q, K, V, COS, SIN, KC, VC, POS, OUT, spb, sqb, sqh, skb, skh, svb, svh, scb, ssb, skcb, skch, skcn,
                svcb, svch, svcn, sob, soh, H: tl.constexpr, HD: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # q/k/v are the product's before this kernel
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)  # 0..H-1: a query head; H..H+n_kv-1: a key head and its value head
    d = tl.arange(0, HD)
    half = HD // 2
    partner = tl.where(d < half, d + half, d - half)  # rotate_half: (-x2, x1)
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(COS + b * scb + d).to(tl.float32)
    sin = tl.load(SIN + b * ssb + d).to(tl.float32)
    if h < H:
        x = tl.load(Q + b * sqb + h * sqh + d).to(tl.float32)
        r = tl.load(Q + b * sqb + h * sqh + partner).to(tl.float32)
        tl.store(OUT + b * sob + h * soh + d, (x * cos + sign * r * sin).to(OUT.dtype.element_ty))
    else:
        kh = h - H
        p = tl.load(POS + b * spb)
        x = tl.load(K + b * skb + kh * skh + d).to(tl.float32)
        r = tl.load(K + b * skb + kh * skh + partner).to(tl.float32)
        tl.store(KC + b * skcb + kh * skch + p * skcn + d, (x * cos + sign * r * sin).to(KC.dtype.element_ty))
        tl.store(VC + b * svcb + kh * svch + p * svcn + d, tl.load(V + b * svb + kh * svh + d))


# A custom op, not a triton_op: see ops/gemv_kernels.py's.
@torch.library.custom_op("tunesmith::rope_write", mutates_args={"k_cache", "v_cache"})
def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    B, _, H, hd = q.shape
    n_kv = k.shape[2]
    out = torch.empty((B, H, 1, hd), device=q.device, dtype=q.dtype)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1
    _rope_write[(B, H + n_kv)](
        q, k, v, cos, sin, k_cache, v_cache, pos, out, pos.stride(0), q.stride(0), q.stride(2), k.stride(0), k.stride(2),
        v.stride(0), v.stride(2), cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        H=H, HD=hd, PDL=pdl, **launch_options(pdl))
    return out


@rope_write.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos, pdl=False):
    B, _, H, hd = q.shape
    return q.new_empty((B, H, 1, hd))
