"""Continuous batching over one static KV cache: answers join free rows (their prompts prefilled together) and
leave between steps; each step decodes one token for every row, pipelined so that the host reads a step's
tokens while the device makes the next."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from tunesmith.decode.grammar import Matcher, apply_masks, new_bitmask
from tunesmith.decode.limits import MAX_TOP_LOGPROBS
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
    matcher: Matcher | None = None  # its grammar's parse state, when constrained (advanced as tokens are read)
    bias: torch.Tensor | None = None  # (V,) its logit_bias, dense on the device
    counts: bool = False  # it has presence/frequency penalties: DecodeSlots._counts holds its token counts
    logprobs: list | None = None  # per-token logprob entries read but not yet handed out
    processed: bool = False  # cfg.processed, read once per step


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
    Events are (key, Delta) pairs; a Delta with finish_reason ends that key's answer and frees its row.

    Answers that join in one step with the same prompt and adapter (n choices of one request) share one prefill:
    the first is computed, the others get a copy of its cache slots and its logits.

    Rows whose config asks for more than the repetition penalty (SamplingConfig.processed: logit_bias,
    presence/frequency penalties, a grammar) are picked from their processed logits outside the compiled step;
    rows that ask for logprobs also get the log-softmax's top entries, copied to the host with the tokens. Steps
    where no row asks for any of this do exactly the work they did without them. A grammar row needs its
    matcher to have taken the last token before its mask is made: in a step with such a row, the step's forward
    is launched first, then the last step's tokens are read (the one wait per step the loop always has), then
    the masks are filled and the rows sampled, so the forward runs on the device while the host works."""

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
        self.vocab = vocab
        self._counts: torch.Tensor | None = None  # (rows, V) float32 generated-token counts, made on first use
        self._lp: tuple | None = None  # device (chosen, top ids, top values) of logprob rows, made on first use
        self._lp_host: tuple | None = None  # ... and their pinned host copies
        self.prefilled_tokens = 0  # prompt tokens run through a prefill forward (shared prefills count once)
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
        stream = _Stream(key, cfg, adapter, len(prompt_ids), min(cfg.max_new_tokens, self.capacity - len(prompt_ids)),
                         TextOut(self.g.tokenizer, cfg.stop, token_sink), seen, gen, pos=len(prompt_ids),
                         prompt=list(prompt_ids))
        if cfg.grammar is not None:
            stream.matcher = cfg.grammar.matcher()
        if cfg.logit_bias:
            ids, values = zip(*cfg.logit_bias)
            stream.bias = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
            stream.bias.index_put_((self._dev(list(ids)),), self._dev(list(values), torch.float32), accumulate=True)
        if cfg.presence_penalty != 0.0 or cfg.frequency_penalty != 0.0:
            if self._counts is None:
                self._counts = torch.zeros(len(self.streams), self.vocab, dtype=torch.float32, device=self.device)
            self._counts[b].zero_()
            stream.counts = True
        if cfg.logprobs is not None:
            stream.logprobs = []
        stream.processed = cfg.processed
        self.streams[b] = stream
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
            first: dict[tuple[int, ...], int] = {}  # prompt -> the row that prefills it
            copies = []  # (row prefilled, row sharing it)
            for b, s in group:
                src = first.setdefault(tuple(s.prompt), b)
                if src != b:
                    copies.append((src, b))
            group = [(b, s) for b, s in group if first[tuple(s.prompt)] == b]
            logits_of = {}
            while group:
                n = 1
                while n < len(group) and (n + 1) * max(len(s.prompt) for _, s in group[: n + 1]) <= self.prefill_tokens:
                    n += 1
                chunk, group = group[:n], group[n:]
                T = max(len(s.prompt) for _, s in chunk)
                ids = self._dev([s.prompt + [0] * (T - len(s.prompt)) for _, s in chunk])
                last = self._dev([len(s.prompt) - 1 for _, s in chunk])
                logits = self.g.decoder.prefill(ids, self.cache.rows(self._dev([b for b, _ in chunk])), last)
                self.prefilled_tokens += sum(len(s.prompt) for _, s in chunk)
                logits_of.update({b: logits[i] for i, (b, _) in enumerate(chunk)})
            if copies:
                self._copy_rows(copies, max(len(self.streams[d].prompt) for _, d in copies))
                logits_of.update({d: logits_of[src] for src, d in copies})
            self._sample(logits_of)
        for _, s in joined:
            s.prompt = None
        if self._rows is not None:
            self._rows.refresh()
        events = self._collect()  # the step in flight, if any (its host copy is read before the next is made)
        self._launch_copy(joined)
        return events + self._collect()  # one wait for all the new rows' first tokens

    def _copy_rows(self, copies: list[tuple[int, int]], length: int) -> None:
        """Copy the first `length` cache slots of each (source, destination) row pair, every layer."""
        src, dst = self._dev([a for a, _ in copies]), self._dev([d for _, d in copies])
        for k, v in zip(self.cache.k, self.cache.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

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
        launched = [(b, self.streams[b]) for b in rows]
        constrained = any(s.matcher is not None for _, s in launched)
        events = None
        try:
            for adapter, group in groups.items():
                self._use(adapter)
                pos = [[s.pos if b in group else self.capacity] for b, s in enumerate(self.streams)]
                t1 = time.perf_counter()
                logits, picked = step(self.tokens, self._dev(pos), self.cache, self._eos_cols, self._blocked,
                                      self._seen, self._penalty)
                self.launch_seconds += time.perf_counter() - t1
                if constrained and events is None:  # matchers take the last tokens before this step's masks
                    launched_at = dict(launched)
                    events = self._collect()
                    group = [b for b in group if self.streams[b] is launched_at[b]]  # not ended just now
                    if not group:
                        continue
                self._sample({b: logits[b] for b in group}, picked)
        finally:
            self.cache.kv_len = None
        for _, s in launched:
            s.pos += 1
        if events is None:
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
        if picked is not None and all(s.cfg.temperature <= 0 and not s.processed for s in streams):
            if not every_row:
                picked = picked[self._dev(rows)]
        else:
            picked = self._pick(logits, rows, streams, penalized)
        for s in streams:
            s.sampled += 1
        if penalized:  # one flat index_fill_: indexing by device scalars would read them back (a wait)
            flat = self._dev([rows[i] for i in penalized]) * self._seen.shape[1] + picked[self._dev(penalized)]
            self._seen.view(-1).index_fill_(0, flat, True)
        counted = [i for i, s in enumerate(streams) if s.counts]
        if counted:
            flat = self._dev([rows[i] for i in counted]) * self.vocab + picked[self._dev(counted)]
            self._counts.view(-1).index_add_(0, flat, torch.ones(len(counted), device=self.device))
        wanting = [i for i, s in enumerate(streams) if s.logprobs is not None]
        if wanting:
            self._logprobs(logits, rows, wanting, picked)
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
        if any(s.processed for s in streams):
            stacked = self._process(stacked, rows, streams)
        picked = greedy_pick(stacked)
        for i, s in enumerate(streams):
            if s.cfg.temperature > 0:  # penalized above; seeded rows keep their own generator
                picked[i] = sample(stacked[i], s.seen, replace(s.cfg, repetition_penalty=1.0), s.gen)
        return picked

    def _process(self, stacked: torch.Tensor, rows: list[int], streams: list[_Stream]) -> torch.Tensor:
        """logit_bias, presence/frequency penalties and grammar masks on the rows' (R, V) float logits."""
        biased = [i for i, s in enumerate(streams) if s.bias is not None]
        if biased:
            stacked = stacked.index_add(0, self._dev(biased), torch.stack([streams[i].bias for i in biased]))
        counted = [i for i, s in enumerate(streams) if s.counts]
        if counted:
            idx = self._dev(counted)
            counts = self._counts[self._dev([rows[i] for i in counted])]
            presence = self._dev([streams[i].cfg.presence_penalty for i in counted], torch.float32)[:, None]
            frequency = self._dev([streams[i].cfg.frequency_penalty for i in counted], torch.float32)[:, None]
            part = stacked[idx] - frequency * counts - presence * (counts > 0)
            stacked = stacked.index_copy(0, idx, part)
        masked = [i for i, s in enumerate(streams) if s.matcher is not None]
        if masked:
            bitmask = new_bitmask(len(masked), self.vocab, self._pinned)  # a fresh pinned buffer: the caching
            for j, i in enumerate(masked):  # allocator reuses it only once its copy has run
                if not streams[i].matcher.done:
                    streams[i].matcher.fill(bitmask, j)
            idx = self._dev(masked)
            stacked = stacked.index_copy(0, idx, apply_masks(stacked[idx], bitmask.to(self.device, non_blocking=True)))
        return stacked

    def _logprobs(self, logits: dict[int, torch.Tensor], rows: list[int], wanting: list[int],
                  picked: torch.Tensor) -> None:
        """The log-softmax of the model's logits for the rows that report logprobs: the picked token's entry and
        the MAX_TOP_LOGPROBS largest, into the device buffers that _launch_copy copies with the tokens."""
        if self._lp is None:
            n, k = len(self.streams), min(MAX_TOP_LOGPROBS, self.vocab)
            self._lp = (torch.zeros(n, dtype=torch.float32, device=self.device),
                        torch.zeros(n, k, dtype=torch.long, device=self.device),
                        torch.zeros(n, k, dtype=torch.float32, device=self.device))
            self._lp_host = tuple(torch.zeros(t.shape, dtype=t.dtype, pin_memory=self._pinned) for t in self._lp)
        chosen, top_ids, top_values = self._lp
        at = self._dev([rows[i] for i in wanting])
        lp = torch.stack([logits[rows[i]] for i in wanting]).float().log_softmax(-1)
        top = lp.topk(top_ids.shape[1])
        chosen[at] = lp.gather(1, picked[self._dev(wanting)][:, None])[:, 0]
        top_ids[at] = top.indices
        top_values[at] = top.values

    def _launch_copy(self, launched: list[tuple[int, _Stream]]) -> None:
        """Start copying the rows' new tokens to the host (after _collect has read the last ones)."""
        self._host.copy_(self.tokens[:, 0], non_blocking=True)
        if self._lp is not None and any(s.logprobs is not None for _, s in launched):
            for host, dev in zip(self._lp_host, self._lp):
                host.copy_(dev, non_blocking=True)
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
        lp = None
        if self._lp is not None and any(s.logprobs is not None for _, s in launched):
            lp = [t.tolist() for t in self._lp_host]
        events = []
        for b, s in launched:
            if self.streams[b] is not s:  # left, or ended at an earlier token
                continue
            tok = host[b]
            finish = None
            if tok in self.eos:
                finish = "stop"
            elif s.matcher is not None and not s.matcher.accept(tok):  # cannot happen with its mask applied
                finish = "stop"
            else:
                if s.logprobs is not None:
                    k = s.cfg.logprobs
                    s.logprobs.append((tok, lp[0][b], lp[1][b][:k], lp[2][b][:k]))
                piece, stopped = s.text.push(tok)
                if piece:
                    events.append((s.key, Delta(piece, logprobs=self._take_logprobs(s))))
                if stopped:
                    finish = "stop"
                elif len(s.text.ids) >= s.max_new:
                    finish = "length"
            if finish:
                rest = s.text.rest()
                if rest:
                    events.append((s.key, Delta(rest, logprobs=self._take_logprobs(s))))
                events.append((s.key, Delta("", finish, s.prompt_tokens, len(s.text.ids),
                                            logprobs=self._take_logprobs(s))))
                self.streams[b] = None
        return events

    @staticmethod
    def _take_logprobs(s: _Stream) -> list | None:
        if not s.logprobs:
            return None
        out, s.logprobs = s.logprobs, []
        return out


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
