"""What the decode step's Triton kernels share: whether they run under Triton's interpreter, and how they launch.

Programmatic dependent launch (Hopper and later GPUs): the decode step's kernels (ops/decode_attention.py,
ops/gemv.py, ops/rope_write.py, and inductor's) launch so that each may start while the kernel before it
finishes; each waits (griddepcontrol.wait) before it reads what that kernel wrote, and the one-row products
stream their first weight tile in before that wait. Whether a step uses it is the caller's choice
(decode/static.Kernels.pdl); `pdl_capable` says whether this machine's GPU can.
"""

from __future__ import annotations

import functools
import os

import torch

# Triton's interpreter runs the kernels on CPU tensors (the CPU tests). It multiplies bf16 tiles wrongly (numpy
# has no bf16), so there the kernels widen their tiles first.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def pdl_capable() -> bool:
    """Whether this machine's GPU launches kernels with programmatic dependent launch (compute capability 9+)."""
    return not INTERPRETING and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def launch_options(pdl: bool) -> dict:
    """The Triton launch options of a kernel launched with (or without) programmatic dependent launch."""
    return {"launch_pdl": True} if pdl else {}
