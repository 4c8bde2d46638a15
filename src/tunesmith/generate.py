"""Token generation: KV-cache decoding (prefill once, then one token per step), sampling, stop handling and
streaming text that never splits a UTF-8 character. `infer`, `eval` and `deploy` all go through `Generator`.

Sampling order follows transformers: repetition penalty, temperature, top-k, top-p. Temperature 0 is greedy.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from tunesmith.errors import UserError
from tunesmith.model.decoder import KVCache, StaticKVCache
from tunesmith.model.load import LoadedModel
from tunesmith.model.lora import RowAdapters, active_adapter, lora_modules, set_active_adapter
from tunesmith.ops import decode_attention as slot_attention
from tunesmith.ops import gemv, rope_write


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


@dataclass
class Delta:
    """One streamed piece: new text; on the last piece, finish_reason is 'stop' or 'length'."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


class Generator:
    def __init__(self, lm: LoadedModel, compiled: bool | None = None, static_len: int = 4096):
        """compiled: decode through a static KV cache and a CUDA-graph-compiled step (default: on CUDA).
        Prompts + answers longer than static_len fall back to the dynamic cache."""
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        on_cuda = lm.model.lm_head_weight.device.type == "cuda"
        self.compiled = on_cuda if compiled is None else compiled
        self.static_len = min(static_len, self.context_length)
        self._static: StaticKVCache | None = None
        self._slots: DecodeSlots | None = None  # the one-row batch that stream() decodes through
        self._compiled_step = functools.partial(decode_step, self.model)
        self.model.fuse_projections()
        if self.compiled and on_cuda:
            import torch._inductor.config as inductor

            inductor.coordinate_descent_tuning = True  # tunes the matrix-vector kernels that decoding is made of
            slot_attention.load_kernels()  # the decode step attends through them (imported here, not while tracing)
            gemv.load_kernels()  # and takes its one-row products through this one
            rope_write.load_kernels()  # and rotates q/k and writes the cache through this one
            options = {"triton.cudagraphs": True}  # mode="reduce-overhead": one CUDA graph per batch shape
            if slot_attention.pdl() and hasattr(inductor.triton, "enable_pdl"):
                options["triton.enable_pdl"] = True  # inductor's kernels launch as ours do (ops/decode_attention.PDL)
            self._compiled_step = torch.compile(self._compiled_step, options=options, fullgraph=True, dynamic=False)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def chat_prompt(self, messages: list[dict], system: str | None = None) -> list[int]:
        """Prompt ids for a conversation; `system` is used only when the messages carry none."""
        if system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + list(messages)
        return self.lm.template.prompt_ids(messages)

    def complete(self, prompt_ids: list[int], cfg: SamplingConfig, use_cache: bool = True) -> Completion:
        ids: list[int] = []
        text, last = "", None
        for d in self.stream(prompt_ids, cfg, use_cache=use_cache, token_sink=ids):
            text += d.text
            last = d
        return Completion(text, last.finish_reason, last.prompt_tokens, last.completion_tokens, ids)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], cfg: SamplingConfig, use_cache: bool = True,
               token_sink: list[int] | None = None) -> Iterator[Delta]:
        if not prompt_ids:
            raise UserError("the prompt is empty.")
        budget = self.context_length - len(prompt_ids)
        if budget <= 0:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens, more than the model's context of "
                            f"{self.context_length}; shorten it.")
        max_new = min(cfg.max_new_tokens, budget)
        if use_cache and self.compiled and len(prompt_ids) + max_new < self.static_len:
            yield from self._stream_static(prompt_ids, replace(cfg, max_new_tokens=max_new), token_sink)
            return
        self.model.fuse_projections()  # no-op unless training moved the weights since (join does it for the above)
        device = self.model.lm_head_weight.device
        gen = None
        if cfg.seed is not None:
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
        eos = set(self.lm.eos_token_ids)
        prompt = torch.tensor([prompt_ids], device=device)
        next_logits = self._decoder(prompt, max_new, use_cache)
        seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=device)
        seen[prompt[0]] = True
        text = TextOut(self.tokenizer, cfg.stop, [] if token_sink is None else token_sink)
        finish = "length"
        for step in range(max_new):
            logits = next_logits(text.ids[-1] if text.ids else None).float()
            if step < cfg.min_new_tokens and eos:
                logits[list(eos)] = float("-inf")
            tok = int(sample(logits, seen, cfg, gen))
            if tok in eos:
                finish = "stop"
                break
            seen[tok] = True
            piece, stopped = text.push(tok)
            if piece:
                yield Delta(piece)
            if stopped:
                finish = "stop"
                break
        rest = text.rest()  # text held back for stop strings or incomplete UTF-8
        if rest:
            yield Delta(rest)
        yield Delta("", finish, len(prompt_ids), len(text.ids))

    def _stream_static(self, prompt_ids: list[int], cfg: SamplingConfig, token_sink: list[int] | None):
        """One answer through a one-row DecodeSlots over the static cache: the CUDA-graph step on CUDA, with the
        host reading each token while the device makes the next."""
        if self._slots is None:
            self._slots = DecodeSlots(self, 1, self.static_len, cache=self._static_cache())
        key = object()
        try:
            events = self._slots.join(key, prompt_ids, cfg, active_adapter(self.model), token_sink)
            while True:
                for _, d in events:
                    yield d
                    if d.finish_reason:
                        return
                events = self._slots.step()
        finally:
            self._slots.leave(key)  # also when the caller stops reading early

    def _decoder(self, prompt: torch.Tensor, max_new: int, use_cache: bool):
        """A function last_token -> next-token logits (vocab,): None on the first call (prefill)."""
        model, device = self.model, prompt.device
        total = prompt.shape[1] + max_new
        if not use_cache:
            ids = prompt[0].tolist()

            def recompute(tok):
                if tok is not None:
                    ids.append(tok)
                return model.logits(model(torch.tensor([ids], device=device))[:, -1])[0]

            return recompute
        cache = KVCache(model.config, 1, total, device, model.lm_head_weight.dtype)

        def cached(tok):
            x = prompt if tok is None else torch.tensor([[tok]], device=device)
            return model.logits(model(x, cache=cache)[:, -1])[0]

        return cached

    def _static_cache(self) -> StaticKVCache:
        if self._static is None:
            self._static = self.static_cache(1, self.static_len)
        return self._static

    def static_cache(self, rows: int, max_len: int) -> StaticKVCache:
        cache = StaticKVCache(self.model.config, rows, max_len, self.model.lm_head_weight.device,
                              self.model.lm_head_weight.dtype)
        self.mark_static(cache.k + cache.v)  # CUDA graphs write the cache in place, never copy it
        return cache

    def mark_static(self, tensors: list[torch.Tensor]) -> None:
        """Inputs of the compiled step that keep their storage from step to step: its CUDA graph reads (and
        writes) them in place instead of copying them in at every replay."""
        if self.compiled:
            for t in tensors:
                torch._dynamo.mark_static_address(t)

    def complete_many(self, prompts: list[list[int]], cfg: SamplingConfig, rows: int) -> Iterator[Completion]:
        """Completions of many prompts in input order, decoded `rows` at a time with continuous batching (a row is
        refilled as soon as its answer ends); each equals `complete` of that prompt alone."""
        if not prompts:
            return
        longest = max(len(p) for p in prompts)
        slots = DecodeSlots(self, min(rows, len(prompts)), min(self.context_length, longest + cfg.max_new_tokens) + 1)
        adapter = active_adapter(self.model)  # the one the caller chose runs every row
        texts, done, waiting, next_out = [""] * len(prompts), {}, list(range(len(prompts))), 0
        while next_out < len(prompts):
            events = []
            while waiting and slots.free_rows:
                i = waiting.pop(0)
                events += slots.join(i, prompts[i], cfg, adapter)
            events += slots.step()
            for i, d in events:
                texts[i] += d.text
                if d.finish_reason:
                    done[i] = Completion(texts[i], d.finish_reason, d.prompt_tokens, d.completion_tokens)
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    @torch.inference_mode()
    def complete_batch(self, prompts: list[list[int]], cfg: SamplingConfig) -> list[Completion]:
        """Several prompts decoded together (eval, batch infer): left-padded, one KV cache of B rows.

        Padding is its own 'sample' in seq_ids, so real tokens never attend to it, and positions count real
        tokens only: each row computes exactly what it would alone (up to float summation order)."""
        if not prompts:
            return []
        self.model.fuse_projections()
        device = self.model.lm_head_weight.device
        B, L = len(prompts), max(len(p) for p in prompts)
        max_new = min(cfg.max_new_tokens, self.context_length - L)
        if max_new <= 0:
            raise UserError(f"a prompt has {L} tokens, more than the model's context of {self.context_length}.")
        pad = [L - len(p) for p in prompts]
        ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)], device=device)
        seq = torch.tensor([[0] * n + [1] * len(p) for n, p in zip(pad, prompts)], device=device)  # (B, L)
        pos = (seq.cumsum(1) - 1).clamp(min=0)
        cache = KVCache(self.model.config, B, L + max_new, device, self.model.lm_head_weight.dtype)
        gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
        eos = torch.tensor(sorted(self.lm.eos_token_ids) or [-1], device=device)
        seen = torch.zeros(B, self.model.config.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):  # real tokens only: the pad id must not be penalized in padded rows
            seen[b, torch.tensor(p, device=device)] = True
        out = [[] for _ in range(B)]
        finish = ["length"] * B
        alive = torch.ones(B, dtype=torch.bool, device=device)
        h = self.model(ids, position_ids=pos, seq_ids=seq, cache=cache)[:, -1]
        next_pos = pos[:, -1] + 1
        for step in range(max_new):
            logits = self.model.logits(h).float()
            if step < cfg.min_new_tokens:
                logits[:, eos] = float("-inf")
            if cfg.temperature <= 0 and cfg.repetition_penalty == 1.0:
                toks = logits.argmax(-1)
            else:
                toks = torch.stack([sample(logits[b], seen[b], cfg, gen) for b in range(B)])
            is_eos = torch.isin(toks, eos)
            for b in torch.nonzero(alive & is_eos).flatten().tolist():
                finish[b] = "stop"
            alive &= ~is_eos
            for b in torch.nonzero(alive).flatten().tolist():
                out[b].append(int(toks[b]))
                if cfg.stop:  # a row stops at its stop string, as stream() does, not at the longest row's end
                    text = self.tokenizer.decode(out[b])
                    if not text.endswith("\ufffd") and _find_stop(text, cfg.stop, 0) is not None:
                        finish[b] = "stop"
                        alive[b] = False
            if not bool(alive.any()) or step == max_new - 1:
                break
            seen[torch.arange(B, device=device), toks] = True
            seq = torch.cat([seq, torch.ones(B, 1, dtype=seq.dtype, device=device)], 1)
            h = self.model(toks[:, None], position_ids=next_pos[:, None], seq_ids=seq, cache=cache)[:, -1]
            next_pos = next_pos + 1
        results = []
        for b in range(B):
            text = self.tokenizer.decode(out[b])
            cut = _find_stop(text, cfg.stop, 0)
            if cut is not None:
                text, finish[b] = text[:cut], "stop"
            results.append(Completion(text, finish[b], len(prompts[b]), len(out[b]), out[b]))
        return results



@dataclass
class _Stream:
    """One answer being decoded in a DecodeSlots row."""

    key: object
    cfg: SamplingConfig
    adapter: str | None
    prompt_tokens: int
    max_new: int
    text: TextOut
    seen: torch.Tensor | None  # its row of DecodeSlots._seen when it has a repetition penalty
    gen: torch.Generator | None
    pos: int = 0  # the slot the row's next fed token is written to
    sampled: int = 0  # tokens sampled on the device so far; the host has read fewer while a step is in flight
    prompt: list[int] | None = None  # until the next step prefills it


PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward when several answers join at once


class DecodeSlots:
    """Continuous batching over one StaticKVCache of `rows` x `max_len` slots: answers join (their prompt is
    prefilled into a free row) and leave between steps, and each `step` decodes one token for every row at once,
    through the Generator's compiled CUDA-graph step on CUDA. Memory is fixed up front: rows x max_len keys/values.

    Steps are pipelined: a step samples each row's next token on the device and feeds it to the next step there,
    and the host reads a step's tokens (text, stop strings, ends) while the device runs the step after it, so
    per-token host work hides behind the GPU instead of adding to it. A row that ended is known one step late;
    the token the device made for it meanwhile is dropped.

    Rows may use different LoRA adapters: a step over a mix runs once, each row's LoRA product masked to its own
    adapter (lora.RowAdapters); prompts are prefilled one forward per adapter. With mix_adapters (the server,
    serving several adapters or an adapter and the base) every step runs that way, mixed or not: one compiled
    CUDA graph for all of them, instead of a compile per adapter (~80 s each for a 7B) on its first request.
    Events are (key, Delta) pairs; a Delta with finish_reason ends that key's answer and frees its row."""

    def __init__(self, generator: Generator, rows: int, max_len: int, cache: StaticKVCache | None = None,
                 mix_adapters: bool = False):
        self.g = generator
        self.mix_adapters = mix_adapters and bool(lora_modules(generator.model))
        self.cache = cache if cache is not None else generator.static_cache(rows, max_len)
        max_len = self.cache.max_len
        self.capacity = max_len - 1  # prompt + answer tokens per row; the last slot is the scratch
        self.streams: list[_Stream | None] = [None] * rows
        self.device = generator.model.lm_head_weight.device
        self.eos = sorted(generator.lm.eos_token_ids)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # what each row feeds next
        self._pinned = self.device.type == "cuda"
        self._host = torch.zeros(rows, dtype=torch.long, pin_memory=self._pinned)  # the tokens, read back
        self._inflight: tuple | None = None  # (event, [(row, stream)]) of the last step, not yet read back
        self._eos_ids = self._dev(self.eos)
        self._neg_inf = torch.tensor(float("-inf"), device=self.device)
        vocab = generator.model.config.vocab_size
        # What the step needs for its own greedy picks (decode_step), kept on the device and rewritten only when
        # a row's value changes: the end tokens, which rows may not end yet, each row's repetition penalty and
        # the tokens it has seen (prompt + answer; rows without a penalty keep 1.0 and ignore theirs).
        self._eos_cols = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self._eos_cols[self.eos] = True
        self._blocked = torch.zeros(rows, 1, dtype=torch.bool, device=self.device)
        self._penalty = torch.ones(rows, 1, dtype=torch.float32, device=self.device)
        self._seen = torch.zeros(rows, vocab, dtype=torch.bool, device=self.device)
        self._picks_state: tuple = ()  # the (blocked, penalty) rows last copied to the device
        generator.mark_static([self._eos_cols, self._blocked, self._penalty, self._seen])
        self._adapter: object = object()  # unknown until the first call sets it
        self._rows: RowAdapters | None = None  # built at the first step over a mix of adapters
        self.steps, self.step_seconds = 0, 0.0  # decode steps so far and their time (model + sampling + text)
        self.wait_seconds = 0.0  # of which waiting for the device to finish the step before (benchmarks)
        self.launch_seconds = 0.0  # and calling the model's step (on CUDA: launching its graph; benchmarks)

    def _use(self, adapter: str | RowAdapters | None) -> None:
        if adapter != self._adapter:
            set_active_adapter(self.g.model, adapter)
            self._adapter = adapter

    @property
    def free_rows(self) -> int:
        return self.streams.count(None)

    @property
    def active(self) -> int:
        return len(self.streams) - self.free_rows

    @torch.inference_mode()
    def join(self, key, prompt_ids: list[int], cfg: SamplingConfig, adapter: str | None = None,
             token_sink: list[int] | None = None) -> list:
        """Give one answer a free row. Its prompt is prefilled by the next `step`, together with every other
        prompt that joined since (one forward per adapter, not one per prompt, and one wait for the GPU), and that
        step's events carry its first token. Returns no events (a list, for callers that collect them)."""
        if not prompt_ids:
            raise UserError("the prompt is empty.")
        if len(prompt_ids) >= self.capacity:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens; at most {self.capacity - 1} fit with room for "
                            f"an answer (prompt + answer per request: --max_model_len when serving); shorten it.")
        b = self.streams.index(None)
        self.g.model.fuse_projections()
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = self._seen[b]
            seen.zero_()
            seen.index_fill_(0, self._dev(prompt_ids), True)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed) if cfg.seed is not None else None
        self.streams[b] = _Stream(key, cfg, adapter, len(prompt_ids),
                                  min(cfg.max_new_tokens, self.capacity - len(prompt_ids)),
                                  TextOut(self.g.tokenizer, cfg.stop, token_sink), seen, gen, pos=len(prompt_ids),
                                  prompt=list(prompt_ids))
        return []

    def _prefill_joined(self) -> list:
        """Prefill the prompts that joined since the last step and sample their first tokens: rows of one adapter
        go through one forward, right-padded to the longest (up to PREFILL_TOKENS tokens per forward). Returns the
        events of the step in flight and the new rows' first tokens."""
        joined = [(b, s) for b, s in enumerate(self.streams) if s is not None and s.prompt is not None]
        if not joined:
            return []
        groups: dict[str | None, list[tuple[int, _Stream]]] = {}
        for b, s in joined:
            groups.setdefault(s.adapter, []).append((b, s))
        for adapter, group in groups.items():
            self._use(adapter)
            while group:
                n = 1
                while n < len(group) and (n + 1) * max(len(s.prompt) for _, s in group[: n + 1]) <= PREFILL_TOKENS:
                    n += 1
                chunk, group = group[:n], group[n:]
                T = max(len(s.prompt) for _, s in chunk)
                ids = self._dev([s.prompt + [0] * (T - len(s.prompt)) for _, s in chunk])
                last = self._dev([len(s.prompt) - 1 for _, s in chunk])
                logits = self.g.model.prefill_static(ids, self.cache.rows(self._dev([b for b, _ in chunk])), last)
                self._sample({b: logits[i] for i, (b, _) in enumerate(chunk)})
        for _, s in joined:
            s.prompt = None
        if self._rows is not None:
            self._rows.refresh()
        events = self._collect()  # the step in flight, if any (its host copy is read before the next is made)
        self._launch_copy(joined)
        return events + self._collect()  # one wait for all the new rows' first tokens

    @torch.inference_mode()
    def step(self):
        """Prefill the answers that joined, then launch one token for every row that may still need one; returns
        the events of the step before (and the joined answers' first tokens)."""
        joined = self._prefill_joined()
        rows = [b for b, s in enumerate(self.streams) if s is not None and s.sampled < s.max_new]
        if not rows:
            return joined + self._collect()
        t0 = time.perf_counter()
        graphs = self.g.compiled and self.device.type == "cuda"
        if graphs:
            cudagraph_thread_setup()
        step = self.g._compiled_step
        if not graphs:  # eager: attend over the filled slots only
            self.cache.kv_len = max(self.streams[b].pos for b in rows) + 1  # + 1: the token being fed
            step = functools.partial(decode_step, self.g.model)
        groups: dict[str | RowAdapters | None, list[int]] = {}
        for b in rows:
            groups.setdefault(self.streams[b].adapter, []).append(b)
        if len(groups) > 1 or self.mix_adapters:  # one pass, each row's LoRA product its own adapter's
            decoding = set(rows)
            groups = {self._row_adapters([s.adapter if b in decoding else None
                                          for b, s in enumerate(self.streams)]): rows}
        self._update_picks_state()
        try:
            for adapter, group in groups.items():
                self._use(adapter)
                pos = [[s.pos if b in group else self.capacity] for b, s in enumerate(self.streams)]
                t1 = time.perf_counter()
                logits, picked = step(self.tokens, self._dev(pos), self.cache, self._eos_cols, self._blocked,
                                      self._seen, self._penalty)
                self.launch_seconds += time.perf_counter() - t1
                self._sample({b: logits[b] for b in group}, picked)
        finally:
            self.cache.kv_len = None
        launched = [(b, self.streams[b]) for b in rows]
        for _, s in launched:
            s.pos += 1
        events = self._collect()  # the previous step's tokens, read while this one runs (it may end rows)
        self._launch_copy(launched)
        self.steps += 1
        self.step_seconds += time.perf_counter() - t0
        return joined + events

    def _row_adapters(self, adapters: list[str | None]) -> RowAdapters:
        """The RowAdapters of this batch, its mask set to `adapters` (one per row). Its stacks are built here the
        first time and brought up to date when answers join (adapters changed in place, as by training in the
        same process, reach the answers that start after)."""
        if self._rows is None:
            dtype = self.g.model.lm_head_weight.dtype
            self._rows = RowAdapters(self.g.model, len(self.streams), self.device, dtype)
        self._rows.assign(adapters)
        return self._rows

    def leave(self, key) -> None:
        """Drop every answer of `key` (cancelled, timed out) and free their rows."""
        self.streams = [None if s is not None and s.key == key else s for s in self.streams]

    def _dev(self, values: list, dtype=torch.long) -> torch.Tensor:
        """A small host list as a device tensor without waiting for the device (a plain copy would)."""
        t = torch.tensor(values, dtype=dtype, pin_memory=self._pinned)
        return t.to(self.device, non_blocking=True)

    def _update_picks_state(self) -> None:
        """Bring the step's blocked-end and penalty rows up to date (a copy only when some row's changed)."""
        blocked = tuple(s is not None and s.sampled < s.cfg.min_new_tokens for s in self.streams)
        penalty = tuple(s.cfg.repetition_penalty if s is not None and s.seen is not None else 1.0
                        for s in self.streams)
        if (blocked, penalty) != self._picks_state:
            self._picks_state = (blocked, penalty)
            self._blocked.copy_(torch.tensor(blocked, pin_memory=self._pinned)[:, None], non_blocking=True)
            self._penalty.copy_(torch.tensor(penalty, dtype=torch.float32, pin_memory=self._pinned)[:, None],
                                non_blocking=True)

    def _sample(self, logits: dict[int, torch.Tensor], picked: torch.Tensor | None = None) -> None:
        """Each row's next token, sampled on the device into self.tokens. A decode step brings its own greedy
        picks (decode_step: one for every row of the batch, made inside the CUDA graph); they stand when every
        row here is greedy. Otherwise (prefills, sampled rows) greedy rows take one argmax here."""
        rows = list(logits)
        streams = [self.streams[b] for b in rows]
        penalized = [i for i, s in enumerate(streams) if s.seen is not None]
        every_row = rows == list(range(len(self.streams)))
        if picked is not None and all(s.cfg.temperature <= 0 for s in streams):
            if not every_row:
                picked = picked[self._dev(rows)]
        else:
            picked = self._pick(logits, rows, streams, penalized)
        for s in streams:
            s.sampled += 1
        if penalized:  # one flat index_fill_: indexing by device scalars would read them back (a wait)
            flat = self._dev([rows[i] for i in penalized]) * self._seen.shape[1] + picked[self._dev(penalized)]
            self._seen.view(-1).index_fill_(0, flat, True)
        if every_row:
            self.tokens[:, 0].copy_(picked)
        else:
            self.tokens[self._dev(rows), 0] = picked

    def _pick(self, logits: dict[int, torch.Tensor], rows: list[int], streams: list[_Stream],
              penalized: list[int]) -> torch.Tensor:
        """The rows' next tokens from their logits: greedy rows in one argmax, sampled rows through sample()."""
        stacked = torch.stack([logits[b] for b in rows]).float()
        blocked = [i for i, s in enumerate(streams) if s.sampled < s.cfg.min_new_tokens]
        if blocked and self.eos:  # a device tensor as the value: a Python float here made the host wait for the GPU
            stacked[self._dev(blocked)[:, None], self._eos_ids] = self._neg_inf
        if penalized:  # the repetition penalty of every row at once, as sample() applies it to one
            idx = self._dev(penalized)
            pen = self._dev([streams[i].cfg.repetition_penalty for i in penalized], torch.float32)[:, None]
            part = stacked[idx]
            part = torch.where(self._seen[self._dev([rows[i] for i in penalized])], torch.where(
                part > 0, part / pen, part * pen), part)
            stacked = stacked.index_copy(0, idx, part)
        picked = stacked.argmax(-1)
        for i, s in enumerate(streams):
            if s.cfg.temperature > 0:  # penalized above; seeded rows keep their own generator
                picked[i] = sample(stacked[i], s.seen, replace(s.cfg, repetition_penalty=1.0), s.gen)
        return picked

    def _launch_copy(self, launched: list[tuple[int, _Stream]]) -> None:
        """Start copying the rows' new tokens to the host (after _collect has read the last ones)."""
        self._host.copy_(self.tokens[:, 0], non_blocking=True)
        event = None
        if self._pinned:
            event = torch.cuda.Event()
            event.record()
        self._inflight = (event, launched)

    def _collect(self):
        """Turn the tokens of the step in flight into text events (rows that left or ended meanwhile are skipped)."""
        if self._inflight is None:
            return []
        event, launched = self._inflight
        self._inflight = None
        if event is not None:
            t0 = time.perf_counter()
            event.synchronize()
            self.wait_seconds += time.perf_counter() - t0
        host = self._host.tolist()
        events = []
        for b, s in launched:
            if self.streams[b] is not s:  # left, or ended at an earlier token
                continue
            tok = host[b]
            finish = None
            if tok in self.eos:
                finish = "stop"
            else:
                piece, stopped = s.text.push(tok)
                if piece:
                    events.append((s.key, Delta(piece)))
                if stopped:
                    finish = "stop"
                elif len(s.text.ids) >= s.max_new:
                    finish = "length"
            if finish:
                rest = s.text.rest()
                if rest:
                    events.append((s.key, Delta(rest)))
                events.append((s.key, Delta("", finish, s.prompt_tokens, len(s.text.ids))))
                self.streams[b] = None
        return events


def decode_step(model, tokens: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache, eos_cols: torch.Tensor,
                blocked: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step, what Generator compiles into a CUDA graph: the next-token logits (B, V) of every row and
    its greedy pick, made inside the step so that a greedy answer's token costs no kernels outside the graph. The
    pick is DecodeSlots._pick's: repetition penalty `penalty` (B, 1) on the tokens `seen` (B, V) (1.0: none),
    end tokens (`eos_cols`, (V,)) ruled out of rows still `blocked` (B, 1) by min_new_tokens, then argmax."""
    logits = model.forward_static(tokens, pos, cache)
    scores = logits.float().masked_fill(eos_cols & blocked, float("-inf"))
    scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
    return logits, argmax_rows(scores)


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(-1) of (B, V) scores in two stages, the max of each of up to 64 pieces of a row, then the
    first piece holding the row's max: compiled, one row's argmax over Qwen's 152k vocabulary took 38 us as one
    reduction (bench/infer.py --parts steps, H200, session 18), a piece per program spreads it. Ties go to the
    first index, as argmax's do."""
    B, V = scores.shape
    pieces = next(n for n in (64, 32, 16, 8, 4, 2, 1) if V % n == 0)
    best, at = scores.view(B, pieces, V // pieces).max(-1)  # first max within each piece
    piece = best.argmax(-1, keepdim=True)  # the first piece holding the row's max
    return (piece * (V // pieces) + at.gather(-1, piece))[:, 0]


def cudagraph_thread_setup() -> None:
    """torch's CUDA-graph trees keep their state in thread-local storage set up only in the thread that imported
    them; a compiled step called from another thread (the server's engine, a benchmark after it) fails an assertion
    (seen with torch 2.11). Set it up for the calling thread."""
    if not torch._C._is_key_in_tls("tree_manager_containers"):
        import threading
        from collections import defaultdict

        from torch._inductor import cudagraph_trees

        local = cudagraph_trees.local  # what cudagraph_trees does for its importing thread, done for this one
        local.tree_manager_containers = {}
        local.tree_manager_locks = defaultdict(threading.Lock)
        torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
        torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


class TextOut:
    """Generated token ids -> streamed text pieces: never half a UTF-8 character, never a stop string (text that may
    be the start of one is held back until it is not).

    Detokenizing is incremental (as TGI and vLLM do): each token decodes only a few-token window, ids[p0:], against
    the text of ids[p0:p1] already known, so a token costs the same at the end of a 2,048-token answer as at its
    start (decoding the whole answer each time cost ~0.2 ms a token on average, per stream)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], ids: list[int] | None = None):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = [] if ids is None else ids
        self.text = ""  # the decoded text of ids[:p1]
        self._p0 = self._p1 = 0
        self.emitted = 0  # characters of self.text already handed out
        self.hold = max((len(x) for x in stop), default=1) - 1

    def _decode_new(self) -> str:
        """Text that the ids after p1 add, or "" while they end inside a UTF-8 character."""
        known = self.tokenizer.decode(self.ids[self._p0 : self._p1])
        window = self.tokenizer.decode(self.ids[self._p0 :])
        if len(window) <= len(known) or window.endswith("\ufffd"):
            return ""
        return window[len(known) :]

    def push(self, tok: int) -> tuple[str, bool]:
        """Add a token: (text now safe to send, whether a stop string has ended the answer)."""
        self.ids.append(tok)
        new = self._decode_new()
        if not new:  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        self.text += new
        self._p0, self._p1 = self._p1, len(self.ids)
        cut = _find_stop(self.text, self.stop, self.emitted)
        end, stopped = (cut, True) if cut is not None else (len(self.text) - self.hold, False)
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece, stopped

    def rest(self) -> str:
        """What is still held back, once the answer has ended (up to any stop string)."""
        if self._p1 < len(self.ids):  # trailing ids that never completed a character decode as U+FFFD
            known = self.tokenizer.decode(self.ids[self._p0 : self._p1])
            self.text += self.tokenizer.decode(self.ids[self._p0 :])[len(known) :]
            self._p0, self._p1 = self._p1, len(self.ids)
        cut = _find_stop(self.text, self.stop, 0)
        text = self.text if cut is None else self.text[:cut]
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index where the earliest stop string begins, searching from slightly before `start`."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s)))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def sample(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token from (vocab,) logits; `seen` marks prompt+generated tokens for the repetition penalty."""
    if cfg.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen[: logits.shape[0]], penalized, logits)
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


def with_defaults(cfg: SamplingConfig, **overrides) -> SamplingConfig:
    """Copy of cfg with the given fields replaced where not None."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
