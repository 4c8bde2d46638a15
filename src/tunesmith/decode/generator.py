"""The generation API that infer, eval, distill, the demo and deploy use: a prompt in, streamed text or whole
completions out.

Every answer decodes through continuous batching (slots.DecodeSlots) over a static KV cache (static.py): one row
for `stream`/`complete`, up to `rows` at once for `complete_many`. On CUDA (`compiled`) the decode step is
compiled and recorded as a CUDA graph; elsewhere the same step runs eagerly, reading only the filled slots.
"""

from __future__ import annotations

from typing import Iterator

import torch

from tunesmith.decode.sampling import SamplingConfig
from tunesmith.decode.slots import DecodeSlots
from tunesmith.decode.static import Kernels, StaticDecoder, StaticKVCache
from tunesmith.decode.text import Completion, Delta
from tunesmith.errors import UserError
from tunesmith.model.load import LoadedModel
from tunesmith.model.lora import active_adapter
from tunesmith.ops import decode_attention as slot_attention
from tunesmith.ops import gemv, rope_write


class Generator:
    def __init__(self, lm: LoadedModel, compiled: bool | None = None, static_len: int = 4096,
                 kernels: Kernels = Kernels()):
        """compiled: decode through a CUDA-graph-compiled step (default: on CUDA). static_len: the slots of the
        one-row cache that `stream` keeps between answers (longer answers get a cache of their own). kernels: the
        step's fast paths (benchmarks vary them)."""
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        on_cuda = lm.model.lm_head_weight.device.type == "cuda"
        self.compiled = on_cuda if compiled is None else compiled
        self.static_len = min(static_len, self.context_length)
        self._slots: DecodeSlots | None = None  # the one-row batch that stream() decodes through
        if self.compiled and on_cuda:  # the step's kernels are imported here, not while tracing
            slot_attention.load_kernels()
            gemv.load_kernels()
            rope_write.load_kernels()
        self.decoder = StaticDecoder(self.model, kernels)
        self.decoder.refresh()
        self.compiled_step = self.decoder.step
        if self.compiled and on_cuda:
            # One CUDA graph per batch shape (what mode="reduce-overhead" sets); coordinate-descent tuning for the
            # matrix-vector kernels that decoding is made of. Options of this compile only, not process-wide.
            options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
            if self.decoder.kernels.pdl:
                options["triton.enable_pdl"] = True  # inductor's kernels launch as ours do (ops/launch.py)
            self.compiled_step = torch.compile(self.decoder.step, options=options, fullgraph=True, dynamic=False)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def chat_prompt(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None
                    ) -> list[int]:
        """Prompt ids for a conversation; `system` is used only when the messages carry none; `tools` (OpenAI
        tool definitions) go to a template that renders them."""
        if system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + list(messages)
        return self.lm.template.prompt_ids(messages, tools)

    def complete(self, prompt_ids: list[int], cfg: SamplingConfig) -> Completion:
        ids: list[int] = []
        text, last = "", None
        for d in self.stream(prompt_ids, cfg, token_sink=ids):
            text += d.text
            last = d
        return Completion(text, last.finish_reason, last.prompt_tokens, last.completion_tokens, ids)

    def stream(self, prompt_ids: list[int], cfg: SamplingConfig, token_sink: list[int] | None = None
               ) -> Iterator[Delta]:
        """One answer as it is made, through a one-row DecodeSlots (on CUDA the host reads each token while the
        device makes the next). Token ids go to `token_sink` when given."""
        if not prompt_ids:
            raise UserError("the prompt is empty.")
        budget = self.context_length - len(prompt_ids)
        if budget <= 0:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens, more than the model's context of "
                            f"{self.context_length}; shorten it.")
        need = len(prompt_ids) + min(cfg.max_new_tokens, budget) + 1  # + 1: the scratch slot
        if self._slots is None or self._slots.cache.max_len < need:
            self._slots = DecodeSlots(self, 1, max(self.static_len, need))
        slots, key = self._slots, object()
        try:
            events = slots.join(key, prompt_ids, cfg, active_adapter(self.model), token_sink)
            while True:
                for _, d in events:
                    yield d
                    if d.finish_reason:
                        return
                events = slots.step()
        finally:
            slots.leave(key)  # also when the caller stops reading early

    def complete_many(self, prompts: list[list[int]], cfg: SamplingConfig, rows: int | None = None
                      ) -> Iterator[Completion]:
        """Completions of many prompts in input order, decoded `rows` at a time (default: all at once) with
        continuous batching (a row is refilled as soon as its answer ends); each equals `complete` of that prompt
        alone."""
        if not prompts:
            return
        longest = max(len(p) for p in prompts)
        if longest >= self.context_length:
            raise UserError(f"a prompt has {longest} tokens, more than the model's context of {self.context_length}.")
        slots = DecodeSlots(self, min(rows or len(prompts), len(prompts)),
                            min(self.context_length, longest + cfg.max_new_tokens) + 1)
        adapter = active_adapter(self.model)  # the one the caller chose runs every row
        texts, ids = [""] * len(prompts), [[] for _ in prompts]
        done, waiting, next_out = {}, list(range(len(prompts))), 0
        while next_out < len(prompts):
            events = []
            while waiting and slots.free_rows:
                i = waiting.pop(0)
                events += slots.join(i, prompts[i], cfg, adapter, ids[i])
            events += slots.step()
            for i, d in events:
                texts[i] += d.text
                if d.finish_reason:
                    done[i] = Completion(texts[i], d.finish_reason, d.prompt_tokens, d.completion_tokens, ids[i])
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

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
