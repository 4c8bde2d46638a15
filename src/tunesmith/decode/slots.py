"""Continuous batching over one static KV cache: answers join free rows (their prompts prefilled together) and
leave between steps; each step decodes one token for every row, pipelined so that the host reads a step's
tokens while the device makes the next."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from tunesmith.decode.sampling import SamplingConfig, greedy_pick, penalize, safe, sample
from tunesmith.decode.static import StaticKVCache
from tunesmith.decode.text import Delta, TextOut
from tunesmith.errors import UserError
from tunesmith.model.lora import RowAdapters, lora_modules, set_active_adapter


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

    def __init__(self, generator, rows: int, max_len: int, cache: StaticKVCache | None = None,
                 mix_adapters: bool = False, prefill_tokens: int = 8192):
        """generator: the Generator whose model, tokenizer and compiled step the rows run on; prefill_tokens:
        padded prompt tokens per prefill forward when several answers join at once."""
        self.g = generator
        self.prefill_tokens = prefill_tokens
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
        # What the step needs for its own greedy picks (StaticDecoder.step), kept on the device and rewritten only when
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
        cfg = safe(cfg)  # sampling values that cannot turn this row's probabilities into inf/nan
        self.g.decoder.refresh()
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
        go through one forward, right-padded to the longest (up to prefill_tokens tokens per forward). Returns the
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
                while n < len(group) and (n + 1) * max(len(s.prompt) for _, s in group[: n + 1]) <= self.prefill_tokens:
                    n += 1
                chunk, group = group[:n], group[n:]
                T = max(len(s.prompt) for _, s in chunk)
                ids = self._dev([s.prompt + [0] * (T - len(s.prompt)) for _, s in chunk])
                last = self._dev([len(s.prompt) - 1 for _, s in chunk])
                logits = self.g.decoder.prefill(ids, self.cache.rows(self._dev([b for b, _ in chunk])), last)
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
        step = self.g.compiled_step
        if not graphs:  # eager: attend over the filled slots only
            self.cache.kv_len = max(self.streams[b].pos for b in rows) + 1  # + 1: the token being fed
            step = self.g.decoder.step
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
        picks (StaticDecoder.step: one for every row of the batch, made inside the CUDA graph); they stand when every
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
        """The rows' next tokens from their logits: greedy rows in one argmax, sampled rows through sample(). A nan
        logit is never picked (greedy_pick), and sample() falls back to the greedy token for a row whose
        probabilities come out unusable, so one row's numbers cannot fail the step of every row."""
        stacked = torch.stack([logits[b] for b in rows]).float()
        blocked = [i for i, s in enumerate(streams) if s.sampled < s.cfg.min_new_tokens]
        if blocked and self.eos:  # a device tensor as the value: a Python float here made the host wait for the GPU
            stacked[self._dev(blocked)[:, None], self._eos_ids] = self._neg_inf
        if penalized:  # the repetition penalty of every row at once, as sample() applies it to one
            idx = self._dev(penalized)
            pen = self._dev([streams[i].cfg.repetition_penalty for i in penalized], torch.float32)[:, None]
            part = penalize(stacked[idx], self._seen[self._dev([rows[i] for i in penalized])], pen)
            stacked = stacked.index_copy(0, idx, part)
        picked = greedy_pick(stacked)
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
