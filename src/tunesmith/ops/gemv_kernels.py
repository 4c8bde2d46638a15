"""The Triton kernel of ops/gemv.py (imported on first use, like ops/decode_attention_kernels.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunesmith.ops.launch import INTERPRETING, launch_options


@triton.jit
def _tile(X, W, n, k, N, K, stride_w, EVEN: tl.constexpr):
    """W[n, k] * x[k] in fp32, a (BLOCK_N, BLOCK_K) tile; W is read once, so it skips the cache."""
    if EVEN:
        x = tl.load(X + k)
        w = tl.load(W + n[:, None] * stride_w + k[None, :], eviction_policy="evict_first")
    else:
        x = tl.load(X + k, mask=k < K, other=0.0)
        w = tl.load(W + n[:, None] * stride_w + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
    return w.to(tl.float32) * x.to(tl.float32)[None, :]


@triton.jit
def _gemv(X, W, BIAS, Y, N, K, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          EVEN: tl.constexpr, INTERPRETING: tl.constexpr, PDL: tl.constexpr):
    """y[n] = sum_k x[k] W[n, k] (+ bias[n]) for BLOCK_N rows of W a program."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    start = 0
    if PDL:  # launched early (ops/launch.py): W is no kernel's output, so its first tile streams in
        k = tl.arange(0, BLOCK_K)  # while the kernel before finishes; x (its output) is read after the wait
        if EVEN:
            w = tl.load(W + n[:, None] * stride_w + k[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(W + n[:, None] * stride_w + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :],
                        other=0.0, eviction_policy="evict_first")
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        acc = w.to(tl.float32) * tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
        start = BLOCK_K
    if INTERPRETING:  # Triton's interpreter (CPU tests) cannot range() over a runtime bound
        k0 = start
        while k0 < K:
            acc += _tile(X, W, n, k0 + tl.arange(0, BLOCK_K), N, K, stride_w, EVEN)
            k0 += BLOCK_K
    else:  # a for loop, which Triton software-pipelines (num_stages)
        for k0 in range(start, K, BLOCK_K):
            acc += _tile(X, W, n, k0 + tl.arange(0, BLOCK_K), N, K, stride_w, EVEN)
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(BIAS + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(Y + n, y.to(Y.dtype.element_ty), mask=n < N)


def launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int, warps: int,
           stages: int, pdl: bool = False) -> torch.Tensor:
    """x (one row of K, any leading shape) times w (N, K), plus bias: shaped like x with N last."""
    N, K = w.shape
    y = torch.empty(x.shape[:-1] + (N,), device=x.device, dtype=x.dtype)
    _gemv[(triton.cdiv(N, block_n),)](
        x, w, x if bias is None else bias, y, N, K, w.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN=N % block_n == 0 and K % block_k == 0, INTERPRETING=INTERPRETING, PDL=pdl,
        num_warps=warps, num_stages=stages, **launch_options(pdl))
    return y


# A custom op, not a triton_op: inductor launches a triton_op's kernel itself, without the launch attribute
# that programmatic dependent launch needs; a custom op's kernel is launched here, inside the step's CUDA graph.
@torch.library.custom_op("tunesmith::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int, warps: int,
         stages: int, pdl: bool = False) -> torch.Tensor:
    return launch(x, weight, bias, block_n, block_k, warps, stages, pdl)


@gemv.register_fake
def _(x, weight, bias, block_n, block_k, warps, stages, pdl=False):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))
