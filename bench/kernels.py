"""Where a GPU step spends its time, kernel by kernel (torch.profiler): shared by bench/train.py and bench/infer.py.
Kernels inside replayed CUDA graphs are reported too."""

from __future__ import annotations

import json
import re

import torch

KERNEL_KINDS = [  # (kind, regex on the kernel name), first match wins
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|sm90_xmma|ampere|cublas|splitk"),
    ("triton", r"^triton"),
    ("optimizer", r"adam|multi_tensor"),
    ("copy", r"copy|memcpy|memset|cat"),
]


def profile(step, label: str, steps: int = 3, top: int = 25) -> None:
    """Print (JSON lines) the GPU time per step of `step()`: totals by kind, then the `top` kernels."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    kinds: dict[str, float] = {}
    for name, _, us in rows:
        kind = next((k for k, rx in KERNEL_KINDS if re.search(rx, name, re.I)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    calls = sum(r[1] for r in rows) // steps
    print(json.dumps({"profile": label, "gpu_ms_per_step": round(total / steps / 1e3, 3), "kernels_per_step": calls,
                      "by_kind_ms": {k: round(v / steps / 1e3, 3) for k, v in sorted(kinds.items(),
                                                                                      key=lambda kv: -kv[1])}}),
          flush=True)
    for name, count, us in rows[:top]:
        print(json.dumps({"profile": label, "kernel": name[:110], "calls": count // steps,
                          "ms": round(us / steps / 1e3, 3), "share": round(us / total, 3)}), flush=True)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def gemm_flop(op: str, shapes: list) -> float:
    """FLOPs of one matrix product from the profiler's recorded input shapes (0 where they do not say)."""
    if op in ("aten::addmm", "aten::baddbmm"):  # (bias, mat1, mat2, beta, alpha[, out])
        shapes = shapes[1:3]
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) in (2, 3)]
    if len(mats) < 2:
        return 0.0
    a, b = mats[0], mats[1]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def gemm_shapes(step, label: str, steps: int = 2, top: int = 40) -> None:
    """Print (JSON lines) GPU time and TFLOP/s of each matrix-product shape in `step()` (the products that
    compiled code hands to cuBLAS are aten ops too), largest first, then their totals."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in GEMM_OPS and e.device_time_total > 0:
            shapes = [list(s) for s in e.input_shapes]
            us = e.device_time_total / steps
            flop = gemm_flop(e.key, shapes) * e.count / steps
            rows.append({"profile": label, "gemm": e.key[6:], "shapes": shapes, "calls": e.count // steps,
                         "ms": round(us / 1e3, 3), "tflops": round(flop / us / 1e6, 1) if flop else None})
    rows.sort(key=lambda r: -r["ms"])
    for r in rows[:top]:
        print(json.dumps(r), flush=True)
    ms = sum(r["ms"] for r in rows)
    flop = sum((r["tflops"] or 0) * r["ms"] for r in rows)
    print(json.dumps({"profile": label, "gemm_ms_per_step": round(ms, 2), "gemm_shapes": len(rows),
                      "gemm_tflops": round(flop / ms, 1) if ms else None}), flush=True)
