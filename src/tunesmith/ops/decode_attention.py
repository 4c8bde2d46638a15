"""One-token attention over a static KV cache that reads only the slots each row has filled (Triton).

A decode step attends each row's new query over its cached keys. The static cache has max_len slots per row so
that one CUDA graph serves every step; the reference (`decode/static.decode_attention`) reads all of them and masks the
unfilled ones, which at 16 rows x 2,048 slots was 3.4 of an 8.1 ms step on the H200. Here each row attends slots
lo..hi (device tensors, so the graph stays the same from step to step) and the GPU reads just those:

- `_partials`, grid (row x KV head, split): the query heads sharing a KV head are one tile (padded to 16 rows for
  the tensor cores); each split walks its share of the row's blocks of BLOCK_N slots with an online softmax and
  writes its running max, sum and weighted values (flash-decoding);
- `_combine`, grid (row x KV head): merges the splits that had blocks into the output.

Rows with lo > hi (nothing to attend) get zeros. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors,
which is how the CPU tests compare them with the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tunesmith.ops.launch import INTERPRETING


class SlotRange(NamedTuple):
    """Row b attends cache slots lo[b]..hi[b] (inclusive); (B,) integer tensors on the cache's device. lo None:
    the decode step's rows, from slot 0, except a row parked on the scratch slot (the last), which reads that slot
    alone; the kernels work lo out themselves (as a tensor it took a kernel of its own before each of them)."""

    lo: torch.Tensor | None
    hi: torch.Tensor


_kernels = None  # the kernels' module once load_kernels() imported it


def load_kernels() -> bool:
    """Import the kernels (call it outside compiled code: Generator does when it compiles on CUDA); False without
    triton."""
    global _kernels
    if _kernels is None:
        try:
            from tunesmith.ops import decode_attention_kernels
        except ImportError:  # CPU installs without triton use the reference
            return False
        _kernels = decode_attention_kernels
    return True


def usable(device: torch.device, head_dim: int) -> bool:
    """Whether a decode step should attend through the kernels: in a compiled step on CUDA (inside a CUDA graph
    the kernels cost nothing to launch; uncompiled decoding slices the cache to the filled length instead), or
    anywhere under Triton's interpreter (tests), once load_kernels() has run."""
    if _kernels is None or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    return INTERPRETING or (device.type == "cuda" and torch.compiler.is_compiling())


BLOCK_N = 128  # slots per block (bench/infer.py --parts attention: 128 beat 32 and 64 at 1 and 16 rows)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: SlotRange, pdl: bool = False,
           block_n: int | None = None, splits: int | None = None) -> torch.Tensor:
    """q (B, H, 1, hd), k/v (B, n_kv, L, hd) with contiguous head_dim -> (B, H, 1, hd): each row over its span.

    pdl: launch with programmatic dependent launch (ops/launch.py). Splits default to enough programs to fill a
    large GPU (~256 of them), at most 16 and one per block."""
    B, n_kv, L = q.shape[0], k.shape[1], k.shape[2]
    block_n = block_n or BLOCK_N
    if splits is None:
        splits = min(16, 1 << (-(-256 // (B * n_kv)) - 1).bit_length(), -(-L // block_n))  # a power of 2
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    lo = span.hi if span.lo is None else span.lo  # not read when the kernels work it out
    return _kernels.attend(q, k, v, lo, span.hi, block_n, max(1, splits), span.lo is None, pdl)


if INTERPRETING:  # tests: every decode step attends through the kernels
    load_kernels()
