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
    positions restart per sample (`position_ids`); compiled on the GPU, through FlexAttention.
  - The projections that read one input (q/k/v; gate/up) are applied by a parameterless slot module
    (`SharedInput`), so that a faster way to compute the same outputs can be swapped in without renaming a
    weight: lora.StackedLoRA in compiled training.

This file knows nothing of LoRA, kernels or KV caches: LoRA wraps the linears (model/lora.py); generation runs the
same layers through its own forward over a static KV cache (decode/static.py).
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
        out.update({hf: getattr(self, ours) for ours, hf in HF_FIELDS.items()}, architectures=[self.architecture])
        out.setdefault("model_type", {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                                      "MistralForCausalLM": "mistral"}.get(self.architecture, "llama"))
        out.setdefault("hidden_act", "silu")
        if self.architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"):
            out["attention_bias"] = self.attention_bias
        return out


# ModelConfig field -> its config.json name, for the fields written back as they are
HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "rope_scaling": "rope_scaling", "tie_embeddings": "tie_word_embeddings",
}


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


class SharedInput(nn.Module):
    """Linears that read the same input (q/k/v, gate/up), each applied to it: [m(x) for m in mods]. A slot with
    no parameters of its own, so that a module computing the same outputs faster can replace it without renaming
    a weight (lora.StackedLoRA)."""

    def forward(self, x: torch.Tensor, *mods: nn.Module) -> list[torch.Tensor]:
        return [m(x) for m in mods]


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
        self.inputs = SharedInput()

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, n_heads, hd), k and v (B, T, n_kv, hd) of x (B, T, hidden), q/k normed where the model does."""
        B, T, _ = x.shape
        q, k, v = self.inputs(x, self.q_proj, self.k_proj, self.v_proj)
        hd = self.cfg.head_dim
        q, k, v = q.view(B, T, -1, hd), k.view(B, T, -1, hd), v.view(B, T, -1, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.heads(x))  # (B, heads, T, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if isinstance(mask, BlockMask):  # packed rows, compiled on the GPU (Decoder.use_flex)
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            y = sdpa(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x (B, heads, T, hd) rotated by cos/sin (B, T, hd)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.inputs = SharedInput()

    def forward(self, x):
        gate, up = self.inputs(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
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

    Queries are the last q_len of kv_len positions. With `seq_ids` (B, q_len or kv_len), tokens attend only
    within their own sample (block-diagonal causal)."""
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
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, hidden).

        position_ids default to arange(T); seq_ids (B, T) marks packed samples (see attention_mask)."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        if self.use_flex and seq_ids is not None:
            mask = packed_block_mask(seq_ids)
        else:
            mask = attention_mask(seq_ids, T, T, input_ids.device)
        for layer in self.model.layers:
            if checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
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

    def compile_layers(self, dynamic: bool | None = None) -> None:
        """torch.compile each decoder layer (fuses RMSNorm, RoPE, SwiGLU and the LoRA adds into few kernels).
        Layers share one code object, so one compilation serves all of them. dynamic=False keeps every new
        sequence length a fresh static compile (the trainer pads rows to few lengths): after a second length
        torch would otherwise switch to shape-generic kernels, 15.1k -> 12.3k tok/s on the H200."""
        for layer in self.model.layers:
            layer.compile(dynamic=dynamic)
        self.use_flex = self.inv_freq.device.type == "cuda"

    def reset_inputs(self) -> None:
        """Every SharedInput slot back to the plain one (a fast path swapped in for generation would keep a moved
        or cast weight's old storage alive)."""
        for layer in self.model.layers:
            layer.self_attn.inputs = SharedInput()
            layer.mlp.inputs = SharedInput()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight)
