"""One-row matrix-vector products for batch-1 decoding (Triton), with tile shapes pinned per weight shape.

At batch 1 a decode step is ~200 matrix-vector products that read 14.1 GB of weights (Qwen2.5-7B), so its speed
is the bandwidth those products reach. Inductor compiles them as reductions whose tile shapes coordinate-descent
tuning picks anew in every compile; on the H200 the down projection (fused with SwiGLU) ran at 2.7 TB/s, and
the same fused kernel took 0.91 or 1.16 ms per step in two compiles. Here each program reads BLOCK_N whole rows
of W in BLOCK_K-wide tiles and sums them in fp32 (bench/infer.py --parts gemv measures every 7B shape against
cuBLAS and inductor). Used only for one-row inputs in compiled CUDA steps (and under Triton's interpreter, which
is how the CPU tests run it); everything else stays F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.ops.launch import INTERPRETING

# The decoder's products that take the kernel (decode/static.Kernels.gemv_roles) (bench/infer.py --parts steps --variants, H200, one row: step
# 4.51 ms with inductor's products, 4.13 with qkv and down through the kernel, 4.04 with all of them; fusing the
# RMSNorm before a product into it as well made the products 0.24 ms slower per step, more than the 56 norm
# kernels it removed: each program re-reads x for its sum of squares before its weights start streaming).
ROLES = frozenset({"qkv", "o", "gate_up", "down", "lm_head"})

_kernels = None  # the kernel's module once load_kernels() imported it


def load_kernels() -> bool:
    """Import the kernel (outside compiled code: Generator calls it when it compiles on CUDA); False without
    triton."""
    global _kernels
    if _kernels is None:
        try:
            from tunesmith.ops import gemv_kernels
        except ImportError:
            return False
        _kernels = gemv_kernels
    return True


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T can run through the kernel: x holds exactly one row, weight is a contiguous
    half-precision (or fp32) matrix, no gradient is wanted, and this is a compiled CUDA step (or the interpreter)."""
    if _kernels is None or torch.is_grad_enabled():
        return False
    if x.numel() != weight.shape[-1] or x.stride(-1) != 1 or not weight.is_contiguous() or weight.dtype != x.dtype:
        return False
    return INTERPRETING or (x.is_cuda and torch.compiler.is_compiling())


def tiles(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for an (n, k) weight. bench/infer.py --parts gemv (H200, 2026-11-29): 4 rows
    x 512 columns a program was the best of 32 tile shapes, or within 1%, on the q/k/v, o, down and lm_head
    shapes of Qwen2.5-7B (gate+up: 2 x 1,024 was best); the long rows of the down projection (k = 18,944) want
    8 warps. Under the interpreter, 1,024 rows a program: it runs programs
    one by one (a vocabulary-sized lm_head would be 38,000 of them)."""
    if INTERPRETING:
        return 1024, 512, 4, 1
    return 4, 512, 8 if k >= 8192 else 4, 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pdl: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias); through the kernel where it can (usable). pdl: launch with programmatic
    dependent launch (ops/launch.py)."""
    if not usable(x, weight):
        return F.linear(x, weight, bias)
    return _kernels.gemv(x, weight, bias, *tiles(*weight.shape), pdl)


if INTERPRETING:  # tests: one-row products run through the kernel
    load_kernels()
