"""How the next token is picked: SamplingConfig, the repetition penalty, temperature / top-k / top-p sampling, and
the greedy picks a compiled decode step makes itself.

Sampling order follows transformers: repetition penalty, temperature, top-k, top-p. Temperature 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0  # benchmarks force equal lengths with this; eos is ignored until reached


def with_defaults(cfg: SamplingConfig, **overrides) -> SamplingConfig:
    """Copy of cfg with the given fields replaced where not None."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty: logits of `seen` tokens divided by `penalty` where positive, multiplied
    where negative. logits (..., V), seen a boolean mask broadcastable to them, penalty a number or a tensor
    broadcastable to them (1.0: none)."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(logits: torch.Tensor, seen: torch.Tensor | None, cfg: SamplingConfig,
           gen: torch.Generator | None) -> torch.Tensor:
    """Next token from (vocab,) logits; `seen` marks prompt+generated tokens for the repetition penalty."""
    if cfg.repetition_penalty != 1.0:
        logits = penalize(logits, seen[: logits.shape[0]], cfg.repetition_penalty)
    if cfg.temperature <= 0:
        return logits.argmax()
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[0]


def greedy_picks(logits: torch.Tensor, eos_cols: torch.Tensor, blocked: torch.Tensor, seen: torch.Tensor,
                 penalty: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token from (B, V) logits, as a compiled decode step makes it: end tokens (`eos_cols`,
    (V,)) ruled out of rows still `blocked` (B, 1) by min_new_tokens, the repetition penalty `penalty` (B, 1) on
    the tokens `seen` (B, V) (1.0: none), then argmax."""
    scores = logits.float().masked_fill(eos_cols & blocked, float("-inf"))
    return argmax_rows(penalize(scores, seen, penalty))


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(-1) of (B, V) scores in two stages, the max of each of up to 64 pieces of a row, then the
    first piece holding the row's max: compiled, one row's argmax over Qwen's 152k vocabulary took 38 us as one
    reduction on the H200 (bench/infer.py --parts steps); a piece per program spreads it. Ties go to the first
    index, as argmax's do."""
    B, V = scores.shape
    pieces = next(n for n in (64, 32, 16, 8, 4, 2, 1) if V % n == 0)
    best, at = scores.view(B, pieces, V // pieces).max(-1)  # first max within each piece
    piece = best.argmax(-1, keepdim=True)  # the first piece holding the row's max
    return (piece * (V // pieces) + at.gather(-1, piece))[:, 0]
