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
