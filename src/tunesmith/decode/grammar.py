"""Constrained decoding: token masks that keep an answer inside a grammar (any JSON object, a JSON schema, or
tool calls of given functions), through xgrammar.

- `grammars_for(tokenizer, vocab_size, stop_ids)`: the tokenizer's `Grammars` (its xgrammar vocabulary and
  compiler, built once per tokenizer and kept); it compiles a request's grammar (`json_schema`, `tool_calls`),
  caching compiled schemas, so a schema sent again costs nothing.
- `Grammar`: a compiled grammar; each answer that follows it gets its own `Matcher` (the parser state).
- `Matcher`: advanced on the host with every token the answer takes; `fill` writes the next token's allowed set
  as a bitmask row (int32 words, bit i of word j = token 32 j + i); `apply_masks` turns such rows into -inf
  logits on the device in one tensor op.

The decode loop (slots.DecodeSlots) reads each step's tokens once anyway (one wait for the device per step); a
constrained row's matcher advances with that read, and the next mask is filled on the host while the device runs
the next step's forward, so masks add host work but no wait. Special tokens never appear inside constrained text
(their strings are not text the grammar can match); the end-of-answer tokens are allowed exactly where the
grammar is complete.

Why xgrammar: its masks come from a per-grammar precomputed token table, 1-2 us a step (median) on SmolLM2's
49k and Qwen2.5's 152k vocabularies against llguidance's 14-33 us (docs/perf-log.md has the measurement).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

import xgrammar as xgr

SCHEMA_CACHE = 64  # compiled schemas kept per tokenizer
MAX_WHITESPACE = 1  # consecutive whitespace characters allowed inside a tool call's arguments


_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " before its message


class GrammarError(ValueError):
    """A schema or tool definition that cannot be compiled into a grammar (the message says why)."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar; `matcher()` starts one answer's parse."""

    compiled: xgr.CompiledGrammar
    vocab_size: int

    def matcher(self) -> "Matcher":
        return Matcher(xgr.GrammarMatcher(self.compiled), self.vocab_size)


class Matcher:
    """One answer's position in its grammar."""

    def __init__(self, m: xgr.GrammarMatcher, vocab_size: int):
        self._m = m
        self.vocab_size = vocab_size
        self.failed = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a (rows, words) int32 host tensor."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by one taken token; False (and `failed`) if the grammar does not allow it."""
        if self.failed or not self._m.accept_token(token):
            self.failed = True
            return False
        return True

    @property
    def done(self) -> bool:
        """The grammar is complete and the end token has been taken (or the answer went off it)."""
        return self.failed or self._m.is_terminated()


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def new_bitmask(rows: int, vocab_size: int, pinned: bool) -> torch.Tensor:
    """A (rows, words) int32 host tensor for `Matcher.fill` (pinned for an asynchronous copy to the GPU)."""
    return torch.full((rows, mask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pinned)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (R, V) with the tokens that the bitmask rows (R, words) leave out set to -inf (a new tensor)."""
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1)[:, : logits.shape[-1]]
    return logits.masked_fill(allowed == 0, float("-inf"))


class Grammars:
    """A tokenizer's xgrammar vocabulary and compiler; compiles request grammars (thread-safe: the API compiles
    off the event loop, several requests at once)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        hf = tokenizer.tok
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(hf.to_str())
        hidden = set(tokenizer.special_ids()) | set(stop_ids)  # control tokens are never grammar text
        vocab = [("" if i in hidden else hf.id_to_token(i) or "") for i in range(vocab_size)]
        self.info = xgr.TokenizerInfo(vocab, vocab_type=meta["vocab_type"], vocab_size=vocab_size,
                                      stop_token_ids=list(stop_ids), add_prefix_space=meta["add_prefix_space"])
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes: list[bytes] | None = None

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for in text (b"" for control tokens)."""
        if self._bytes is None:
            self._bytes = list(self.info.decoded_vocab)
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""

    def _cached(self, key: str, compile_fn) -> Grammar:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            grammar = Grammar(compile_fn(), self.vocab_size)
        except (RuntimeError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GrammarError(_SOURCE_PREFIX.sub("", first)) from None
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > SCHEMA_CACHE:
                self._cache.popitem(last=False)
        return grammar

    def json_schema(self, schema: dict | bool | None) -> Grammar:
        """Any JSON object (schema None), or JSON text that matches `schema`; compact (no whitespace between
        tokens), as a weak model otherwise may spend its tokens on spaces."""
        schema = {"type": "object"} if schema is None else schema
        text = json.dumps(schema)  # key order kept: properties are generated in the schema's order
        return self._cached("schema:" + text, lambda: self._compiler.compile_json_schema(
            text, any_whitespace=False, strict_mode=True))

    def tool_calls(self, functions: list[dict], parallel: bool) -> Grammar:
        """One or more tool calls (one when not `parallel`) of the given functions ({"name", "parameters"}), in
        the form tools.py renders and parses:

            <tool_call>
            {"name": "NAME", "arguments": {...}}
            </tool_call>

        each call's arguments matching that function's parameter schema; calls separated by a newline."""
        tags = [{"type": "tag", "begin": "<tool_call>\n" + json.dumps({"name": f["name"]})[:-1] + ', "arguments": ',
                 "content": {"type": "json_schema", "json_schema": f.get("parameters") or {"type": "object"},
                             "max_whitespace_cnt": MAX_WHITESPACE},
                 "end": "}\n</tool_call>"} for f in functions]
        tag = {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                                                    "at_least_one": True, "stop_after_first": not parallel}}
        text = json.dumps(tag)
        return self._cached("tools:" + text, lambda: self._compiler.compile_structural_tag(text))


_GRAMMARS: "weakref.WeakKeyDictionary[object, Grammars]" = weakref.WeakKeyDictionary()
_GRAMMARS_LOCK = threading.Lock()


def grammars_for(tokenizer, vocab_size: int, stop_ids) -> Grammars:
    """The tokenizer's Grammars, built on first use (~0.1-0.7 s, the vocabulary's token table) and kept while
    the tokenizer lives."""
    with _GRAMMARS_LOCK:
        g = _GRAMMARS.get(tokenizer)
        if g is None or g.vocab_size != vocab_size:
            g = _GRAMMARS[tokenizer] = Grammars(tokenizer, vocab_size, sorted(stop_ids))
        return g
