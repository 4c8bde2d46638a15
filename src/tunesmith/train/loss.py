"""Where hidden states become a loss, without ever holding the full (tokens x vocab) logits.

Only supervised positions go through the lm_head (identity data supervises ~20-40% of tokens), and those in
chunks of `chunk` tokens. When gradients are wanted, each chunk's gradient is made right there in the forward
pass (softmax minus one-hot, times the lm_head): the logits are used once and dropped, never recomputed in
backward, and backward only scales the stored (tokens x hidden) gradient. At 2048 tokens x 152k vocab the full
fp32 logits would be 1.2 GB; one 512-token chunk is 0.3 GB.

With `fused` (the trainer's compiled runs on CUDA) the step from a chunk's logits to its loss and gradient is one
compiled function (`logit_grad`: inductor makes it a reduction and an elementwise kernel over the bf16 logits)
instead of ~7 passes over an fp32 copy (cast, logsumexp, subtract, exp, the one-hot step, cast back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.packing import IGNORE


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()  # (n, vocab), fp32 for a stable log-softmax
    return F.cross_entropy(logits, y, reduction="sum")


def logit_grad(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE(logits_i, y_i), d(that)/d(logits) = softmax - one_hot in the logits' dtype), math in fp32."""
    x = logits.float()
    lse = torch.logsumexp(x, -1)
    loss = (lse - x.gather(1, y[:, None]).squeeze(1)).sum()
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == y[:, None]
    return loss, (torch.exp(x - lse[:, None]) - hit.float()).to(logits.dtype)


_compiled_logit_grad = None


def _logit_grad_fn(fused: bool, device: torch.device):
    """logit_grad compiled (fused, on CUDA), logit_grad as it is (fused elsewhere: the tests), or None (the
    in-place eager steps of _LinearCrossEntropy)."""
    global _compiled_logit_grad
    if not fused:
        return None
    if device.type != "cuda":
        return logit_grad
    if _compiled_logit_grad is None:
        _compiled_logit_grad = torch.compile(logit_grad, fullgraph=True)
    return _compiled_logit_grad


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) with the gradients of h and W computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk: int, grad_h: bool, grad_w: bool, fused: bool = False):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if grad_h else None
        dw = torch.zeros_like(weight) if grad_w else None  # accumulated in the weight's dtype, as autograd would
        step = _logit_grad_fn(fused, h.device)
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i : i + chunk], y[i : i + chunk]
            if step is not None:
                loss, g = step(F.linear(hc, weight), yc)
                total += loss
            else:
                logits = F.linear(hc, weight).float()
                lse = torch.logsumexp(logits, -1)
                total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(yc), device=g.device), yc] -= 1.0  # d(CE)/d(logits) = softmax - one_hot
                g = g.to(h.dtype)
            if grad_h:
                dh[i : i + chunk] = g @ weight
            if grad_w:
                dw.addmm_(g.t(), hc)
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.grads = (grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grad_h, grad_w = ctx.grads
        dh = next(saved) if grad_h else None
        dw = next(saved) if grad_w else None
        scale = lambda t: None if t is None else t * grad_total.to(t.dtype)  # noqa: E731
        return scale(dh), scale(dw), None, None, None, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk: int = 512, fused: bool = False) -> torch.Tensor:
    """Sum of token losses over positions with labels != IGNORE. hidden (..., H), labels (...). fused: each
    chunk's loss and gradient through logit_grad (compiled on CUDA)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = y != IGNORE
    h, y = h[keep], y[keep]  # (n_supervised, H)
    grad_h = torch.is_grad_enabled() and h.requires_grad
    grad_w = torch.is_grad_enabled() and weight.requires_grad
    if grad_h or grad_w:
        return _LinearCrossEntropy.apply(h, weight, y, chunk, grad_h, grad_w, fused)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + _chunk_loss_sum(h[i : i + chunk], weight, y[i : i + chunk])
    return total


def chunked_kl_sum(hidden: torch.Tensor, base_hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 512) -> torch.Tensor:
    """Sum over positions with labels != IGNORE of KL(base || tuned) between the next-token distributions that
    `base_hidden` (no gradient) and `hidden` give through the lm_head `weight`; chunked like the cross-entropy.
    Each chunk is checkpointed, so backward holds one chunk's logits at a time, never the row's."""
    from torch.utils.checkpoint import checkpoint

    keep = labels.reshape(-1) != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    hb = base_hidden.reshape(-1, base_hidden.shape[-1])[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(_chunk_kl_sum, h[i : i + chunk], hb[i : i + chunk], weight, use_reentrant=False)
    return total


def _chunk_kl_sum(h: torch.Tensor, hb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    tuned = F.log_softmax(F.linear(h, weight).float(), -1)
    with torch.no_grad():
        base = F.log_softmax(F.linear(hb, weight).float(), -1)
    return F.kl_div(tuned, base, log_target=True, reduction="sum")
