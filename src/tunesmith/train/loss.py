"""Where hidden states become a loss, without ever holding the full (tokens x vocab) logits.

Only supervised positions go through the lm_head (identity data supervises ~20-40% of tokens), and those in
chunks of `chunk` tokens, each under activation checkpointing: backward recomputes one chunk's logits at a time.
At 2048 tokens x 152k vocab the full fp32 logits would be 1.2 GB; one 1024-token chunk is 0.6 GB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.packing import IGNORE


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()  # (n, vocab), fp32 for a stable log-softmax
    return F.cross_entropy(logits, y, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk: int = 1024) -> torch.Tensor:
    """Sum of token losses over positions with labels != IGNORE. hidden (..., H), labels (...)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = y != IGNORE
    h, y = h[keep], y[keep]  # (n_supervised, H)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i : i + chunk], y[i : i + chunk]
        if torch.is_grad_enabled() and (hc.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, hc, weight, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hc, weight, yc)
    return total
