"""The Triton kernel of ops/gemv.py (imported on first use, like ops/decode_attention_kernels.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunesmith.ops.decode_attention import INTERPRETING


@triton.jit
def _tile(X, NW, W, n, k, rstd, N, K, stride_w, NORM: tl.constexpr, EVEN: tl.constexpr):
    """W[n, k] * x[k] in fp32, a (BLOCK_N, BLOCK_K) tile; W is read once, so it skips the cache. With NORM, x is
    RMSNorm(x) as the decoder's RMSNorm rounds it: (x * rstd) to x's dtype, times the norm weight in that dtype."""
    if EVEN:
        x = tl.load(X + k)
        w = tl.load(W + n[:, None] * stride_w + k[None, :], eviction_policy="evict_first")
    else:
        x = tl.load(X + k, mask=k < K, other=0.0)
        w = tl.load(W + n[:, None] * stride_w + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
    if NORM:
        x = (x.to(tl.float32) * rstd).to(X.dtype.element_ty)
        x = (x.to(tl.float32) * tl.load(NW + k, mask=k < K, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    return w.to(tl.float32) * x.to(tl.float32)[None, :]


@triton.jit
def _square(X, k, K):
    x = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
    return x * x


@triton.jit
def _gemv(X, NW, W, BIAS, RES, Y, N, K, stride_w, eps, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
          RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
          INTERPRETING: tl.constexpr):
    """y[n] = res[n] + (sum_k rmsnorm(x)[k] W[n, k] + bias[n]) for BLOCK_N rows of W a program (norm, bias and
    residual each optional), rounded where the unfused ops would round."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rstd = 1.0
    if NORM:  # each program sums x's squares itself: x is one row, read from L2
        ss = tl.zeros([BLOCK_K], tl.float32)
        if INTERPRETING:
            k0 = 0
            while k0 < K:
                ss += _square(X, k0 + tl.arange(0, BLOCK_K), K)
                k0 += BLOCK_K
        else:
            for k0 in range(0, K, BLOCK_K):
                ss += _square(X, k0 + tl.arange(0, BLOCK_K), K)
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if INTERPRETING:  # Triton's interpreter (CPU tests) cannot range() over a runtime bound
        k0 = 0
        while k0 < K:
            acc += _tile(X, NW, W, n, k0 + tl.arange(0, BLOCK_K), rstd, N, K, stride_w, NORM, EVEN)
            k0 += BLOCK_K
    else:  # a for loop, which Triton software-pipelines (num_stages)
        for k0 in range(0, K, BLOCK_K):
            acc += _tile(X, NW, W, n, k0 + tl.arange(0, BLOCK_K), rstd, N, K, stride_w, NORM, EVEN)
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(BIAS + n, mask=n < N, other=0.0).to(tl.float32)
    y = y.to(Y.dtype.element_ty)
    if RESIDUAL:
        y = (tl.load(RES + n, mask=n < N, other=0.0).to(tl.float32) + y.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + n, y, mask=n < N)


def launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
           eps: float, residual: torch.Tensor | None, block_n: int, block_k: int, warps: int, stages: int,
           wrap=lambda kernel: kernel) -> torch.Tensor:
    """residual + (rmsnorm(x) @ w.T + bias) for x one row of K (any leading shape): shaped like x with N last."""
    N, K = w.shape
    y = torch.empty(x.shape[:-1] + (N,), device=x.device, dtype=x.dtype)
    wrap(_gemv)[(triton.cdiv(N, block_n),)](
        x, x if norm_weight is None else norm_weight, w, x if bias is None else bias,
        x if residual is None else residual, y, N, K, w.stride(0), eps, NORM=norm_weight is not None,
        HAS_BIAS=bias is not None, RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN=N % block_n == 0 and K % block_k == 0, INTERPRETING=INTERPRETING, num_warps=warps, num_stages=stages)
    return y


@torch.library.triton_op("tunesmith::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
         eps: float, residual: torch.Tensor | None, block_n: int, block_k: int, warps: int, stages: int
         ) -> torch.Tensor:
    return launch(x, weight, bias, norm_weight, eps, residual, block_n, block_k, warps, stages,
                  wrap=torch.library.wrap_triton)
