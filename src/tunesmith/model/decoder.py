"""One decoder for the Llama family: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

Textbook pre-norm transformer (RMSNorm, RoPE, GQA attention, SwiGLU MLP). Variants are flags read from
config.json, never branches on the model type:
  - `attention_bias`   q/k/v projections carry a bias (Qwen2/2.5).
  - `qk_norm`          per-head RMSNorm on q and k before RoPE (Qwen3).
  - `tie_embeddings`   lm_head shares the embedding matrix (SmolLM2, small Qwen).
  - `rope_scaling`     llama3-style frequency scaling (Llama 3.1+), or linear.
Parameter names mirror the HF checkpoints (`model.layers.3.self_attn.q_proj.weight`), so weights load by name
and LoRA adapters save in PEFT's naming with no table.

Deviations from the HF implementation, all for what comes after loading:
  - `forward` returns hidden states, not logits. Logits are `model.logits(h)`; training computes the loss in
    chunks (train/loss.py) so the (tokens x vocab) logits never exist at once.
  - Packed rows: `seq_ids` (B, T) gives each token's sample index; attention is block-diagonal causal and
    positions restart per sample (`position_ids`).
  - A pre-allocated KV cache (`KVCache`) for generation: prefill writes T positions, decode writes one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tunesmith.errors import UserError
from tunesmith.model.lora import shared_adapter
from tunesmith.ops import decode_attention as slot_attention
from tunesmith.ops import gemv, rope_write

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        """Read an HF config.json dict; unsupported architectures are a user error."""
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(
                f"{source}: architecture '{arch}' is not supported; tunesmith supports "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}."
            )
        try:
            hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
            qwen2 = arch == "Qwen2ForCausalLM"
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                rope_scaling=_rope_scaling(cfg),
                # Qwen2 always has q/k/v bias (its config has no flag); Llama/Qwen3 say so in attention_bias.
                attention_bias=qwen2 or bool(cfg.get("attention_bias", False)),
                qk_norm=arch == "Qwen3ForCausalLM",
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                architecture=arch,
                extra=cfg,
            )
        except KeyError as e:
            raise UserError(f"{source}: required field {e.args[0]!r} is missing; is this a complete config.json?")

    def to_hf(self) -> dict:
        """The config.json dict (used when writing merged / fully fine-tuned models)."""
        out = dict(self.extra)
        out.update(
            architectures=[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_embeddings,
        )
        out.setdefault("model_type", {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                                      "MistralForCausalLM": "mistral"}.get(self.architecture, "llama"))
        out.setdefault("hidden_act", "silu")
        if self.architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"):
            out["attention_bias"] = self.attention_bias
        return out


def _rope_scaling(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    return None if kind in (None, "default") else dict(rs, rope_type=kind)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies on the CPU, with llama3 / linear scaling applied."""
    hd = cfg.head_dim
    # device="cpu" even inside `with torch.device("meta")` (load.py): meta arange runs torch's Python
    # reference implementation, whose first call imports dynamo and sympy (1.2 s).
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device="cpu") / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.float()
    if rs["rope_type"] == "linear":
        return (inv / rs["factor"]).float()
    if rs["rope_type"] == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old_ctx / lo, old_ctx / hi
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= hi_wl) & (wavelen <= lo_wl)
        return torch.where(is_mid, mid, scaled).float()
    raise UserError(f"rope_scaling type '{rs['rope_type']}' is not supported (supported: llama3, linear).")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32, then cast back before the weight multiply (as HF Llama/Qwen do).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Pre-allocated keys/values for every layer: (B, n_kv, max_len, hd) each; `length` tokens are filled."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos=None) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} > {self.max_len}")
        self.k[layer][:, :, self.length : self.length + t] = k
        self.v[layer][:, :, self.length : self.length + t] = v
        end = self.length + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class StaticKVCache:
    """Fixed-shape keys/values for CUDA-graph decoding (gpt-fast style): a decode step attends over all max_len
    slots with a mask and writes its keys at position *tensors*, so one captured graph serves every step.

    Rows are independent streams (continuous batching): each writes at its own positions `pos` (B, T).
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
        if self.row_ids is not None:  # a prefill from slot 0 (prefill_static): it attends to its own keys only
            return k, v
        if self.kv_len is None:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, : self.kv_len], self.v[layer][:, :, : self.kv_len]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | slot_attention.SlotRange | None) -> torch.Tensor:
    """One new token per row against its cached keys: q (B, H, 1, hd), k/v (B, n_kv, L, hd), mask (B|1, 1, 1, L)
    or a SlotRange (each row's filled slots: the Triton kernel of ops/decode_attention.py reads only those).

    Written out instead of SDPA: the query heads sharing a KV head become that head's rows, so each cached key is
    read once (SDPA's GQA path copies K/V per query head), and on Hopper a masked SDPA call goes to cuDNN, which
    builds a new plan whenever L changes, that is at every step of a growing cache (measured: 14 tok/s eager)."""
    if isinstance(mask, slot_attention.SlotRange):
        return slot_attention.attend(q, k, v, mask)
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    scores = torch.matmul(q.view(B, n_kv, H // n_kv, hd), k.transpose(-1, -2)).float() * hd**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v).view(B, H, 1, hd)


# Uncompiled on the GPU, SDPA keeps to its prebuilt kernels: its default pick on Hopper, cuDNN, compiles kernels
# at run time on first use of a shape (~1.8 s of the tutorial's 10-step seed job went there, bench/seed_job.py).
# Compiled layers (long runs) keep the default: there cuDNN is the fastest causal kernel (bench/train.py
# --attention, 4x2048: cuDNN 1.1 ms, flash 1.9 ms forward+backward).
EAGER_GPU_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Causal attention (mask None) or attention under a boolean mask (True = may attend); GQA heads."""
    if not q.is_cuda or torch.compiler.is_compiling():
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with sdpa_kernel(EAGER_GPU_BACKENDS):
        if mask is None:  # flash: GQA built in
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # masks go to the memory-efficient kernel, which wants as many KV heads as query heads
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd, bias = cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fused (weight, bias): fuse_projections

    def forward(self, x, cos, sin, mask, cache: KVCache | StaticKVCache | None, cache_pos=None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        qkv = fused_product(self.qkv, (self.q_proj, self.k_proj, self.v_proj), x, "qkv")
        if qkv is not None:
            nq, nkv = self.cfg.num_heads * hd, self.cfg.num_kv_heads * hd
            q, k, v = qkv.split([nq, nkv, nkv], -1)
        else:
            q, k, v = each_output((self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(B, T, -1, hd)  # (B, T, n_heads, hd)
        k = k.view(B, T, -1, hd)  # (B, T, n_kv, hd)
        v = v.view(B, T, -1, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(mask, slot_attention.SlotRange) and rope_write.available() and cache.row_ids is None:
            # a decode step through the kernels: rotation and cache write in one (ops/rope_write.py)
            kc, vc = cache.k[self.layer], cache.v[self.layer]
            y = decode_attention(rope_write.rope_write(q, k, v, cos, sin, kc, vc, cache_pos), kc, vc, mask)
            return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), "o")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v, cache_pos)
        if cache is not None and T == 1:
            y = decode_attention(q, k, v, mask)
        elif isinstance(mask, BlockMask):  # packed rows, compiled on the GPU (Decoder.use_flex)
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            y = sdpa(q, k, v, mask)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), "o")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: tuple[torch.Tensor, None] | None = None  # fused weight: fuse_projections

    def forward(self, x):
        gate_up = fused_product(self.gate_up, (self.gate_proj, self.up_proj), x, "gate_up")
        if gate_up is not None:
            gate, up = gate_up.chunk(2, -1)
        else:
            gate, up = each_output((self.gate_proj, self.up_proj), x)
        return project(self.down_proj, F.silu(gate) * up, "down")


def project(mod: nn.Module, x: torch.Tensor, role: str) -> torch.Tensor:
    """mod(x); a plain linear (or a LoRA-wrapped one with no adapter active) goes through gemv.linear, which
    takes one-row products of compiled decode steps."""
    base = getattr(mod, "base_layer", mod)
    if getattr(mod, "active", None) is None and isinstance(base, nn.Linear):
        return gemv.linear(x, base.weight, base.bias, role)
    return mod(x)


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


def fused_current(fused, mods: list[nn.Module]) -> bool:
    """Whether the modules' weights are still the views fuse_linears made (a dtype or device move, or sharding,
    gives them new storage, and the fused copy would be stale)."""
    if fused is None:
        return False
    for t, attr in zip(fused, ("weight", "bias")):
        if t is None:
            continue
        ptr, row = t.data_ptr(), t[0].numel() * t.element_size()
        for m in mods:
            own = getattr(getattr(m, "base_layer", m), attr)
            if own.data_ptr() != ptr or own.dtype != t.dtype or own.device != t.device:
                return False
            ptr += own.shape[0] * row
    return True


FUSE_LORA = True  # False: an active adapter always runs module by module (benchmarks: bench/infer.py --parts steps)


def fused_product(fused, mods: tuple[nn.Module, ...], x: torch.Tensor, role: str) -> torch.Tensor | None:
    """The outputs of `mods` side by side, through their fused matrix (fuse_linears), or None where it cannot stand
    in for them. Without an active adapter it can when no gradient is wanted (the modules' own parameters must
    receive those). With one LoRA adapter active on all of them, no dropout and frozen base weights, their adapters
    go together as well: A matrices stacked, B matrices block-diagonal, so

      y = x W_cat^T + s * (x A_cat^T) B_diag^T

    is three products where the modules take three each (six for gate/up, nine for q/k/v); the gradients reaching
    each A and B are the same (through the stacking). Generation with an unmerged adapter runs this way (H200,
    batch-1 step 5.86 -> 4.68 ms); the trainer does not fuse (4x2048 compiled: 16,700 vs 16,726 tok/s module by
    module, bench/train.py +fused). Other cases (dropout, adapters mixed by row, scalings that differ) run module
    by module."""
    if fused is None:
        return None
    if all(getattr(m, "active", None) is None for m in mods):
        return None if torch.is_grad_enabled() else gemv.linear(x, *fused, role)
    name = shared_adapter(mods)
    if name is None or not FUSE_LORA:
        return None
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad
                                       for m in mods for p in (m.base_layer.weight, m.base_layer.bias)):
        return None  # the bases' own parameters want gradients (an adapter over full fine-tuning)
    A = torch.cat([m.lora_A[name].weight for m in mods]).to(x.dtype)  # as LoRALinear: products in x's dtype
    B = torch.block_diag(*[m.lora_B[name].weight for m in mods]).to(x.dtype)
    return gemv.linear(x, *fused, role) + F.linear(F.linear(x, A), B) * mods[0].scaling[name]


STACK_LORA = True  # False: compiled training runs each module's adapter apart (bench/train.py +unstacked A/B)


def each_output(mods: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """[m(x) for m in mods], for modules that read the same x. In compiled training with one adapter on all of them
    (no dropout) their A matrices are stacked: x is read by one rank-r product instead of one per module, and in
    backward the A gradients come from one product and x's LoRA gradient from one (q/k/v: 3 products of x a layer
    -> 1, gate/up: 2 -> 1). H200, Qwen2.5-7B shapes: 17,192 -> 17,362 tok/s at 4x2048 in one batch, lean mode
    12,036 -> 12,260, same peaks (bench/train.py +unstacked, session 21 run 15)."""
    name = shared_adapter(mods) if STACK_LORA and torch.is_grad_enabled() and torch.compiler.is_compiling() else None
    if name is None:
        return [m(x) for m in mods]
    A = [m.lora_A[name].weight for m in mods]
    hs = F.linear(x, torch.cat(A).to(x.dtype)).split([a.shape[0] for a in A], -1)  # products in x's dtype
    return [m.base_layer(x) + F.linear(h, m.lora_B[name].weight.to(x.dtype)) * m.scaling[name] for m, h in zip(mods, hs)]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device, where load.py builds the model before
    assigning the checkpoint: torch's meta `normal_` is written in Python, and its first call imports sympy and
    dynamo (1.4 s of an otherwise 1 s GGUF load)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Backbone(nn.Module):
    """Holds the HF `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask(seq_ids: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """Boolean (B|1, 1, q_len, kv_len) mask, True = may attend; None means plain causal SDPA suffices.

    Queries are the last q_len of kv_len positions (a KV cache holds the first kv_len - q_len).
    With `seq_ids` (B, q_len or kv_len), tokens attend only within their own sample (block-diagonal causal);
    batched generation marks left padding as its own sample this way, with seq_ids over the whole kv_len."""
    if seq_ids is None and q_len == kv_len:
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    causal = q_pos[:, None] >= torch.arange(kv_len, device=device)[None, :]  # (q_len, kv_len)
    if seq_ids is None:
        return causal[None, None]
    k_ids = seq_ids
    q_ids = seq_ids[:, -q_len:]
    same = q_ids[:, :, None] == k_ids[:, None, :]  # (B, q_len, kv_len)
    return (same & causal[None])[:, None]


def packed_block_mask(seq_ids: torch.Tensor) -> BlockMask:
    """attention_mask's block-diagonal causal mask as a FlexAttention BlockMask: 128x128 tiles that cross no
    sample boundary run unmasked, tiles wholly across samples are skipped. On the H200 at 4x2048 tokens of 60-300
    token samples: 1.0 ms forward+backward vs 3.0 ms for SDPA with the dense mask (bench/train.py --attention)."""
    B, T = seq_ids.shape

    def same_sample_causal(b, h, q, k):
        return (seq_ids[b, q] == seq_ids[b, k]) & (q >= k)

    return create_block_mask(same_sample_causal, B, None, T, T, device=seq_ids.device)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(torch.get_default_device()), persistent=False)
        # Packed rows attend through FlexAttention: set by compile_layers on the GPU (uncompiled flex_attention
        # materializes the full scores, so the dense-mask SDPA path serves eager and CPU runs).
        self.use_flex = False

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (B, T, hd), computed in fp32 from positions."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, hidden).

        position_ids default to cache.length + arange(T); seq_ids marks packed samples (see attention_mask) and
        may span the cached positions too (B, cache.length + T)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        if self.use_flex and seq_ids is not None and cache is None:
            mask = packed_block_mask(seq_ids)
        else:
            mask = attention_mask(seq_ids, T, past + T, input_ids.device)
        for layer in self.model.layers:
            if checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.model.embed_tokens.weight
        if table.device == input_ids.device:
            return self.model.embed_tokens(input_ids)
        # the table lives in CPU memory (park_embeddings): only the rows looked up travel to the GPU
        return F.embedding(input_ids.cpu(), table).to(input_ids.device)

    def park_embeddings(self, device) -> None:
        """Keep the (frozen, untied) embedding table on `device`: the CPU frees 1.0 GiB of a 7B's GPU memory
        while LoRA trains (training's forward looks rows up there); back on the GPU before generating."""
        assert not self.config.tie_embeddings and not self.model.embed_tokens.weight.requires_grad
        self.model.embed_tokens.to(device)

    def forward_static(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache,
                       last: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, vocab) after tokens written at slots `pos` (B, T) of a StaticKVCache (after each
        row's token `last[b]` when given, else its final one).

        Decode (T = 1, the shape `torch.compile` captures in a CUDA graph): each row is its own stream at its own
        position; keys beyond a query's position are masked, so stale slots never leak in. With `cache.kv_len` set
        (a prefill from position 0, or eager decoding) only the first kv_len slots are read."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(pos, x.dtype)
        if cache.kv_len == T:  # prefill of fresh streams: plain causal attention over their own T slots
            mask = None
        elif T == 1 and slot_attention.usable(input_ids.device, self.config.head_dim):
            mask = slot_attention.SlotRange(None, pos[:, 0])  # a row on the scratch slot (the last) reads it alone
        else:
            slots = torch.arange(cache.kv_len or cache.max_len, device=input_ids.device)
            mask = (slots[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, slots)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, pos)
        x = x[:, -1] if last is None else x[torch.arange(B, device=x.device), last]
        return self.logits(self.model.norm(x))

    def prefill_static(self, input_ids: torch.Tensor, cache: StaticKVCache, last: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Prompts (B, T) of fresh streams into slots 0..T-1 of `cache` (or a `cache.rows(...)` view): logits
        (B, V) after each row's token `last[b]` (prompts shorter than T are padded after their end: causal
        attention keeps the pads out of the real tokens, and decoding overwrites their slots before reading them)."""
        B, T = input_ids.shape
        cache.kv_len = T
        try:
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
            return self.forward_static(input_ids, pos, cache, last)
        finally:
            cache.kv_len = None

    def compile_layers(self, dynamic: bool | None = None) -> None:
        """torch.compile each decoder layer (fuses RMSNorm, RoPE, SwiGLU and the LoRA adds into few kernels).
        Layers share one code object, so one compilation serves all of them. dynamic=False keeps every new
        sequence length a fresh static compile (the trainer pads rows to few lengths): after a second length
        torch would otherwise switch to shape-generic kernels, 15.1k -> 12.3k tok/s on the H200."""
        for layer in self.model.layers:
            layer.compile(dynamic=dynamic)
        self.use_flex = self.inv_freq.device.type == "cuda"

    def fuse_projections(self) -> None:
        """q/k/v and gate/up each become one matrix (their modules' weights are views into it), so generating
        without an active adapter reads each layer's input-side weights in two matrix products instead of five:
        fewer kernels per decode step, and the small k/v products no longer run alone. Generation calls this
        before each answer: it is cheap when the fused matrices are current and rebuilds stale ones."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            if not fused_current(attn.qkv, qkv):
                attn.qkv = fuse_linears(qkv)
            if not fused_current(mlp.gate_up, gate_up):
                mlp.gate_up = fuse_linears(gate_up)

    def unfuse_projections(self) -> None:
        """Forget the fused matrices (training moves, casts or shards weights; a stale fused copy would keep their
        old storage alive). The modules' weights stay as they are."""
        for layer in self.model.layers:
            layer.self_attn.qkv = layer.mlp.gate_up = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gemv.linear(hidden, self.lm_head_weight, None, "lm_head")
