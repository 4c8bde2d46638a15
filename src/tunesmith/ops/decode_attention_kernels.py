"""The Triton kernels of ops/decode_attention.py (imported on first use: triton and torch's kernel wrapping take
~1.4 s to import, which every `tunesmith` command would otherwise pay at start)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunesmith.ops.launch import INTERPRETING, launch_options

LOG2E = 1.4426950408889634  # the kernels use exp2: scores are scaled into log2 units


@triton.jit
def _split_span(LO, HI, b, L, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, LO_FROM_HI: tl.constexpr):
    """Row b's first block, number of blocks, and blocks per split."""
    hi = tl.minimum(tl.load(HI + b), L - 1)
    if LO_FROM_HI:  # from slot 0, or the scratch slot (the last) alone
        lo = tl.where(hi == L - 1, hi, 0)
    else:
        lo = tl.load(LO + b)
    first = lo // BLOCK_N
    nblocks = tl.where(hi >= lo, hi // BLOCK_N + 1 - first, 0)
    return lo, hi, first, nblocks, tl.cdiv(nblocks, SPLITS)

@triton.jit
def _partials(Q, K, V, LO, HI, O, M, S, sqb, sqh, skb, skh, skn, svb, svh, svn, L, SCALE: tl.constexpr,
              N_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr,
              BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, DOT_F32: tl.constexpr, LO_FROM_HI: tl.constexpr,
              PDL: tl.constexpr):
    if PDL:  # q and the cache's new slot are the kernels' before this one
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // N_KV
    kv = bh % N_KV
    lo, hi, first, nblocks, per = _split_span(LO, HI, b, L, BLOCK_N, SPLITS, LO_FROM_HI)
    blk = first + split * per
    end = tl.minimum(blk + per, first + nblocks)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HD)
    q = tl.load(Q + b * sqb + (kv * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HD], tl.float32)
    k_row = K + b * skb + kv * skh
    v_row = V + b * svb + kv * svh
    while blk < end:  # every block here holds at least one slot in lo..hi, so the row max stays finite
        n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_row + n[:, None] * skn + d[None, :], mask=(n < L)[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * SCALE  # log2 units: exp2 below
        s = tl.where(((n >= lo) & (n <= hi))[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_row + n[:, None] * svn + d[None, :], mask=(n < L)[:, None], other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        blk += 1
    live = (g < G) & (split * per < nblocks)  # splits without blocks write nothing
    part = (bh * SPLITS + split) * G_PAD + g
    tl.store(M + part, m_i, mask=live)
    tl.store(S + part, l_i, mask=live)
    tl.store(O + part[:, None] * HD + d[None, :], acc, mask=live[:, None])

@triton.jit
def _combine(O, M, S, LO, HI, OUT, sob, soh, L, N_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
             HD: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, LO_FROM_HI: tl.constexpr,
             PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    b = bh // N_KV
    kv = bh % N_KV
    lo, hi, first, nblocks, per = _split_span(LO, HI, b, L, BLOCK_N, SPLITS, LO_FROM_HI)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HD)
    m = tl.full([G_PAD], -1e30, tl.float32)  # finite, so the first split's weight is exp2(-huge) = 0, not nan
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HD], tl.float32)
    split = 0
    while split * per < nblocks:  # the splits that had blocks
        part = (bh * SPLITS + split) * G_PAD + g
        m_s = tl.load(M + part, mask=g < G, other=-1e30)
        m_new = tl.maximum(m, m_s)
        a, a_s = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
        total = total * a + tl.load(S + part, mask=g < G, other=0.0) * a_s
        o_s = tl.load(O + part[:, None] * HD + d[None, :], mask=(g < G)[:, None], other=0.0)
        acc = acc * a[:, None] + o_s * a_s[:, None]
        m = m_new
        split += 1
    out = tl.where(total[:, None] > 0, acc / tl.maximum(total, 1e-30)[:, None], 0.0)
    tl.store(OUT + b * sob + (kv * G + g)[:, None] * soh + d[None, :], out.to(OUT.dtype.element_ty),
             mask=(g < G)[:, None])

# A custom op, not a triton_op: see ops/gemv_kernels.py's.
@torch.library.custom_op("tunesmith::decode_attention", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
           block_n: int, splits: int, lo_from_hi: bool = False, pdl: bool = False) -> torch.Tensor:
    B, H, _, hd = q.shape
    n_kv, L = k.shape[1], k.shape[2]
    G = H // n_kv
    G_PAD = max(16, triton.next_power_of_2(G))
    o = torch.empty((B * n_kv, splits, G_PAD, hd), device=q.device, dtype=torch.float32)
    m = torch.empty((B * n_kv, splits, G_PAD), device=q.device, dtype=torch.float32)
    s = torch.empty_like(m)
    out = torch.empty((B, H, 1, hd), device=q.device, dtype=q.dtype)
    _partials[(B * n_kv, splits)](
        q, k, v, lo, hi, o, m, s, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), L, SCALE=hd**-0.5 * LOG2E, N_KV=n_kv, G=G, G_PAD=G_PAD, HD=hd,
        BLOCK_N=block_n, SPLITS=splits, DOT_F32=INTERPRETING, LO_FROM_HI=lo_from_hi, PDL=pdl,
        **launch_options(pdl))
    _combine[(B * n_kv,)](
        o, m, s, lo, hi, out, out.stride(0), out.stride(1), L, N_KV=n_kv, G=G, G_PAD=G_PAD, HD=hd,
        BLOCK_N=block_n, SPLITS=splits, LO_FROM_HI=lo_from_hi, PDL=pdl, **launch_options(pdl))
    return out


@attend.register_fake
def _(q, k, v, lo, hi, block_n, splits, lo_from_hi=False, pdl=False):
    return q.new_empty(q.shape)
