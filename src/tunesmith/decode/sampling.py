"""How the next token is picked: SamplingConfig, the repetition penalty, temperature / top-k / top-p sampling, and
the greedy picks a compiled decode step makes itself.

Sampling order follows transformers: repetition penalty, temperature, top-k, top-p. Temperature 0 is greedy.

Values are kept in numerically safe ranges (`safe`): a temperature below MIN_TEMPERATURE is greedy, top_p and the
repetition penalty are clamped to their bounds, and a row whose probabilities still come out unusable (inf/nan
logits from the model) takes its greedy token, so nothing a request asks for can make torch.multinomial fail the
decode step that other requests share. The API and the CLI refuse values outside these bounds up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from tunesmith.decode.limits import (MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY,
                                     MIN_TEMPERATURE, MIN_TOP_P)


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
    # The API's extra processing of a row's logits, in this order after the repetition penalty: logit_bias
    # ((token, bias) pairs added), presence/frequency penalties (OpenAI's: subtracted once for every generated
    # token seen / per occurrence), then a grammar's mask (decode/grammar.py). logprobs: k (0-20) to report each
    # taken token's log-probability and the k most likely, from the model's own log-softmax (before all of these
    # and before temperature); None for none.
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: object | None = None  # a decode.grammar.Grammar
    logprobs: int | None = None

    @property
    def processed(self) -> bool:
        """Whether the row's logits need work beyond the repetition penalty before its token is picked."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 \
            or self.grammar is not None


def _finite(v: float, default: float) -> float:
    return v if math.isfinite(v) else default


def safe(cfg: SamplingConfig) -> SamplingConfig:
    """cfg with its sampling values in numerically safe ranges: a temperature under MIN_TEMPERATURE (or not a
    finite number) is greedy (0), one over MAX_TEMPERATURE is MAX_TEMPERATURE, top_p lies in [MIN_TOP_P, 1] and
    the repetition penalty in [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY]; the same object when already so."""
    temperature = _finite(cfg.temperature, 0.0)
    temperature = 0.0 if temperature < MIN_TEMPERATURE else min(temperature, MAX_TEMPERATURE)
    top_p = min(max(_finite(cfg.top_p, 1.0), MIN_TOP_P), 1.0)
    penalty = min(max(_finite(cfg.repetition_penalty, 1.0), MIN_REPETITION_PENALTY), MAX_REPETITION_PENALTY)
    top_k = max(cfg.top_k, 0)
    if (temperature, top_p, penalty, top_k) == (cfg.temperature, cfg.top_p, cfg.repetition_penalty, cfg.top_k):
        return cfg
    return replace(cfg, temperature=temperature, top_p=top_p, repetition_penalty=penalty, top_k=top_k)


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
    """Next token from (vocab,) logits; `seen` marks prompt+generated tokens for the repetition penalty. Values
    outside the safe ranges are clamped (`safe`); when the probabilities still hold inf/nan or sum to nothing, the
    row's greedy token is taken instead (decided on the device: no wait for it)."""
    cfg = safe(cfg)
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        logits = penalize(logits, seen[: logits.shape[0]], cfg.repetition_penalty)
    greedy = greedy_pick(logits)
    if cfg.temperature <= 0:
        return greedy
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest set reaching top_p
        drop[0] = False  # and always the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    total = probs.sum()  # nan or inf when any probability is
    usable = torch.isfinite(total) & (total > 0)
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0) * usable  # all 0 when unusable: then
    probs = probs.index_add(0, greedy.reshape(1), (~usable).to(probs.dtype).reshape(1))  # the greedy token alone
    return torch.multinomial(probs, 1, generator=gen)[0]


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim with nan counted as -inf (a nan is never picked over a number)."""
    return torch.nan_to_num(logits.float(), nan=float("-inf")).argmax(-1)


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
