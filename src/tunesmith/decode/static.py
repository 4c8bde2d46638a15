"""The decoder's layers run for generation: over a static KV cache, with q/k/v and gate/up fused into one matrix
each, through the GPU kernels of ops/ where they apply. What a compiled decode step (a CUDA graph) is made of.

- `StaticKVCache`: fixed-shape keys/values, rows x max_len slots (gpt-fast style). Each row is its own stream at
  its own positions (continuous batching); writes go to position *tensors*, so one captured graph serves every
  step.
- `FusedInputs`: the module swapped into the decoder's SharedInput slots for generation: the projections that
  read one input become one product over one matrix (their modules' weights become views into it, nothing is
  stored twice), with an active LoRA adapter's terms beside it (lora.stacked_lora_term).
- `StaticDecoder`: prefill (prompts into fresh rows) and `step` (one token for every row, its logits and its
  greedy pick) over such a cache; same math as Decoder.forward (tests compare them).
- `Kernels`: which fast paths the step takes; benchmarks vary it, generation runs the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.decode.sampling import greedy_picks
from tunesmith.model.decoder import Decoder, ModelConfig, SharedInput, rotate, sdpa
from tunesmith.model.lora import shared_adapter, stacked_lora_term
from tunesmith.ops import decode_attention as slot_attention
from tunesmith.ops import gemv, rope_write
from tunesmith.ops.launch import pdl_capable


@dataclass(frozen=True)
class Kernels:
    """The fast paths of a decode step (each beside a reference that the tests compare it with)."""

    attention: bool = True  # one-token attention reads only each row's filled slots (ops/decode_attention.py)
    rope_write: bool = True  # ... with q/k's rotation and the cache write in one kernel (ops/rope_write.py)
    gemv_roles: frozenset[str] = gemv.ROLES  # the products that take the one-row kernel (ops/gemv.py)
    pdl: bool = True  # kernels launch with programmatic dependent launch where the GPU can (ops/launch.py)
    fuse_lora: bool = True  # an active adapter's terms beside the fused products (else module by module)


class StaticKVCache:
    """Keys/values for every layer, (rows, n_kv, max_len, hd) each. A decode step writes each row's new key at its
    position `pos` (B, T) and attends with a mask (or the slot kernel), so stale slots never leak in.
    `kv_len`, when set, limits attention to the first kv_len slots (prefill, and uncompiled decoding)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.kv_len: int | None = None
        self.row_ids: torch.Tensor | None = None  # set on a rows() view

    def rows(self, rows: torch.Tensor) -> "StaticKVCache":
        """Rows `rows` (a (B,) index tensor) of this cache, sharing storage: prefills of fresh streams write
        straight into the batch cache's rows, whichever rows are free."""
        view = object.__new__(StaticKVCache)
        view.k, view.v, view.max_len, view.kv_len = self.k, self.v, self.max_len, None
        view.row_ids = rows
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        rows = (self.row_ids if self.row_ids is not None else torch.arange(k.shape[0], device=k.device))[:, None]
        self.k[layer][rows, :, pos] = k.transpose(1, 2)  # (B, T, n_kv, hd) into each row's own slots
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        if self.row_ids is not None:  # a prefill from slot 0: it attends to its own keys only
            return k, v
        if self.kv_len is None:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, : self.kv_len], self.v[layer][:, :, : self.kv_len]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One new token per row against its cached keys: q (B, H, 1, hd), k/v (B, n_kv, L, hd), mask (B|1, 1, 1, L).
    The reference of ops/decode_attention.py's kernel, which reads only the filled slots.

    Written out instead of SDPA: the query heads sharing a KV head become that head's rows, so each cached key is
    read once (SDPA's GQA path copies K/V per query head), and on Hopper a masked SDPA call goes to cuDNN, which
    builds a new plan whenever L changes, that is at every step of a growing cache (measured: 14 tok/s eager)."""
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    scores = torch.matmul(q.view(B, n_kv, H // n_kv, hd), k.transpose(-1, -2)).float() * hd**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v).view(B, H, 1, hd)


def fuse_linears(mods: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of outs, in) weight (and bias) for linears that read the same input; each module's own weight
    becomes a view into it, so nothing is stored twice and in-place changes (merging a LoRA, an optimizer step)
    show in both."""
    bases = [getattr(m, "base_layer", m) for m in mods]  # LoRALinear wraps the nn.Linear
    with torch.no_grad():
        weight = torch.cat([b.weight for b in bases])
        bias = torch.cat([b.bias for b in bases]) if bases[0].bias is not None else None
        start = 0
        for b in bases:
            n = b.weight.shape[0]
            b.weight.data = weight[start : start + n]
            if bias is not None:
                b.bias.data = bias[start : start + n]
            start += n
    if weight.is_cuda:  # CUDA graphs read it in place, like a parameter (unmarked, a graph input is copied)
        for t in (weight, bias):
            if t is not None:
                torch._dynamo.mark_static_address(t)
    return weight, bias


class FusedInputs(nn.Module):
    """A SharedInput slot whose linears' weights are one matrix (fuse_linears): their outputs side by side in one
    product, split back. Without an active adapter it stands in for them when no gradient is wanted (the modules'
    own parameters must receive those). With one LoRA adapter active on all of them (no dropout, frozen bases),
    the adapter's terms go beside it (lora.stacked_lora_term):

      y = x W_cat^T + s * (x A_cat^T) B_diag^T,

    three products where the modules take three each (six for gate/up, nine for q/k/v): H200, batch-1 step with
    an unmerged r8 adapter 5.86 -> 4.68 ms (bench/infer.py --parts steps --variants 'one LoRA adapter' 'one LoRA
    adapter, module by module'). Other cases (dropout, adapters mixed by row, scalings that differ) run module
    by module. The fused tensors are plain attributes, not parameters: the state dict does not change."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: tuple[int, ...], role: str,
                 kernels: Kernels):
        super().__init__()
        self.weight, self.bias, self.sizes, self.kernels = weight, bias, sizes, kernels  # sizes: each module's outs
        # plain flags, read by the compiled step: each attribute it reads is a guard checked at every call
        self.gemv, self.pdl, self.fuse_lora = role in kernels.gemv_roles, kernels.pdl, kernels.fuse_lora

    def current(self, mods) -> bool:
        """Whether the modules' weights are still the views fuse_linears made (a dtype or device move, or sharding,
        gives them new storage, and the fused copy would be stale)."""
        for t, attr in zip((self.weight, self.bias), ("weight", "bias")):
            if t is None:
                continue
            ptr, row = t.data_ptr(), t[0].numel() * t.element_size()
            for m in mods:
                own = getattr(getattr(m, "base_layer", m), attr)
                if own.data_ptr() != ptr or own.dtype != t.dtype or own.device != t.device:
                    return False
                ptr += own.shape[0] * row
        return True

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv:
            return gemv.linear(x, self.weight, self.bias, self.pdl)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, *mods: nn.Module) -> list[torch.Tensor]:
        sizes = list(self.sizes)
        if all(getattr(m, "active", None) is None for m in mods):
            if torch.is_grad_enabled():
                return [m(x) for m in mods]
            return list(self._product(x).split(sizes, -1))
        name = shared_adapter(mods) if self.fuse_lora else None
        if name is None or (torch.is_grad_enabled() and any(
                p is not None and p.requires_grad for m in mods for p in (m.base_layer.weight, m.base_layer.bias))):
            return [m(x) for m in mods]  # dropout, mixed rows; or the bases want gradients (full fine-tuning)
        return list((self._product(x) + stacked_lora_term(mods, name, x)).split(sizes, -1))


def fuse_projections(model: Decoder, kernels: Kernels = Kernels()) -> None:
    """Swap FusedInputs into every SharedInput slot of the model (q/k/v, gate/up): generating reads each layer's
    input-side weights in two products instead of five, fewer kernels per decode step, and the small k/v products
    no longer run alone. Cheap when the slots are current (generation calls it before each answer); stale ones
    (the weights were moved, cast or sharded since) are rebuilt. Only plain nn.Linear bases fuse: a quantized
    base (model/quant.py) has no matrix to concatenate, and its slot stays (or goes back to) the plain one."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, mods, role in ((attn, (attn.q_proj, attn.k_proj, attn.v_proj), "qkv"),
                                  (mlp, (mlp.gate_proj, mlp.up_proj), "gate_up")):
            slot = owner.inputs
            if not all(isinstance(getattr(m, "base_layer", m), nn.Linear) for m in mods):
                if isinstance(slot, FusedInputs):
                    owner.inputs = SharedInput()
                continue
            if isinstance(slot, FusedInputs) and slot.current(mods):
                if slot.kernels != kernels:
                    owner.inputs = FusedInputs(slot.weight, slot.bias, slot.sizes, role, kernels)
            else:
                sizes = tuple(getattr(m, "base_layer", m).weight.shape[0] for m in mods)
                owner.inputs = FusedInputs(*fuse_linears(list(mods)), sizes, role, kernels)


class StaticDecoder:
    """A Decoder's layers over a StaticKVCache, with the kernels `kernels` names: prefill of fresh rows, and the
    decode step that Generator compiles into a CUDA graph."""

    def __init__(self, model: Decoder, kernels: Kernels = Kernels()):
        if kernels.pdl and not pdl_capable():
            kernels = replace(kernels, pdl=False)
        self.model, self.kernels = model, kernels

    def refresh(self) -> None:
        """The fused projections, (re)built where stale (fuse_projections)."""
        fuse_projections(self.model, self.kernels)

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, vocab) after tokens written at slots `pos` (B, T) of the cache (after each row's
        token `last[b]` when given, else its final one).

        Decode (T = 1, the shape a CUDA graph captures): each row attends its slots up to its position (through
        the slot kernel where usable, which reads only those; else all slots, masked). With `cache.kv_len` set (a
        prefill from position 0, or eager decoding) only the first kv_len slots are read."""
        model = self.model
        B, T = input_ids.shape
        x = model.model.embed_tokens(input_ids)
        cos, sin = model.rope(pos, x.dtype)
        span, mask = None, None  # prefill of fresh rows: plain causal attention over their own T slots
        if T == 1 and self.kernels.attention and slot_attention.usable(input_ids.device, model.config.head_dim):
            span = slot_attention.SlotRange(None, pos[:, 0])  # a row on the scratch slot (the last) reads it alone
        elif cache.kv_len != T:
            slots = torch.arange(cache.kv_len or cache.max_len, device=input_ids.device)
            mask = (slots[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, slots)
        for layer in model.model.layers:
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin, span, mask, cache, pos)
            h = layer.post_attention_layernorm(x)
            gate, up = layer.mlp.inputs(h, layer.mlp.gate_proj, layer.mlp.up_proj)
            x = x + self._project(layer.mlp.down_proj, F.silu(gate) * up, "down")
        x = x[:, -1] if last is None else x[torch.arange(B, device=x.device), last]
        x = model.model.norm(x)
        if "lm_head" in self.kernels.gemv_roles:
            return gemv.linear(x, model.lm_head_weight, None, self.kernels.pdl)
        return model.logits(x)

    def _attention(self, attn, x, cos, sin, span, mask, cache: StaticKVCache, pos) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = attn.heads(x)  # (B, T, heads, hd)
        pdl = self.kernels.pdl
        if span is not None and self.kernels.rope_write and rope_write.available() and cache.row_ids is None:
            # rotation and cache write in one kernel (ops/rope_write.py), then the slot kernel
            kc, vc = cache.k[attn.layer], cache.v[attn.layer]
            y = slot_attention.attend(rope_write.rope_write(q, k, v, cos, sin, kc, vc, pos, pdl), kc, vc, span, pdl)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k, v = cache.update(attn.layer, k, v, pos)
            if span is not None:
                y = slot_attention.attend(q, k, v, span, pdl)
            elif T == 1:
                y = decode_attention(q, k, v, mask)
            else:
                y = sdpa(q, k, v, mask)
        return self._project(attn.o_proj, y.transpose(1, 2).reshape(B, T, -1), "o")

    def _project(self, mod: nn.Module, x: torch.Tensor, role: str) -> torch.Tensor:
        """mod(x); a plain linear (or a LoRA-wrapped one with no adapter active) through the one-row kernel where
        `role` takes it."""
        base = getattr(mod, "base_layer", mod)
        if role in self.kernels.gemv_roles and getattr(mod, "active", None) is None and isinstance(base, nn.Linear):
            return gemv.linear(x, base.weight, base.bias, self.kernels.pdl)
        return mod(x)

    def prefill(self, input_ids: torch.Tensor, cache: StaticKVCache, last: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts (B, T) of fresh streams into slots 0..T-1 of `cache` (or a `cache.rows(...)` view): logits
        (B, V) after each row's token `last[b]` (prompts shorter than T are padded after their end: causal
        attention keeps the pads out of the real tokens, and decoding overwrites their slots before reading them)."""
        B, T = input_ids.shape
        cache.kv_len = T
        try:
            return self.forward(input_ids, torch.arange(T, device=input_ids.device).expand(B, T), cache, last)
        finally:
            cache.kv_len = None

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache, eos_cols: torch.Tensor,
             blocked: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step, what Generator compiles into a CUDA graph: the next-token logits (B, V) of every row
        and its greedy pick (sampling.greedy_picks), made inside the step so that a greedy answer's token costs
        no kernels outside the graph."""
        logits = self.forward(tokens, pos, cache)
        return logits, greedy_picks(logits, eos_cols, blocked, seen, penalty)
