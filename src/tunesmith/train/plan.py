"""The memory planner: which way a run trains on the GPU it has, decided before anything loads.

Modes, fastest first (H200, Qwen2.5-7B shapes, LoRA r8, rows of 2,048 tokens one by one as the trainer runs
them; `bench/train.py --only tunesmith --cases 4x2048seq+compile 4x2048seq+budget0+park+compile` compiled,
`bench/small_gpu.py --cards 80 --jobs long` eager, 2026-12-04):
  bf16        frozen bf16 base, activations kept for backward     compiled 16,450 tok/s 23.6 GiB, eager 8.4k 30.0 GiB
  lean        recompute in backward, embedding table in CPU memory  compiled 12,260 tok/s 14.9 GiB
  4bit        4-bit (NF4) base, activations kept
  4bit-lean   4-bit base, recompute in backward

The estimate of a mode is what it keeps resident (weights, LoRA A/B with their AdamW moments, or every
parameter's fp32 moments for full fine-tuning) plus its activations for the longest row the step will run, per
token:
  kept:        bytes x layers x (hidden + intermediate): 7.6 compiled (the 9.1 GiB of 2,048 tokens above), 12.5
               eager (15.5 GiB), whose unfused norms and SwiGLU keep more intermediates;
  recomputed:  (2 x layers x hidden + kept x (hidden + intermediate)) x 1.5, the layer inputs kept plus one
               layer's activations rebuilt at a time (lean's 1.5 GiB at 2,048 tokens above),
plus the cross-entropy's chunk of logits (512 tokens x vocabulary, fp32, twice) and a 10% margin for the
allocator. The planner takes the first mode whose estimate fits the device's memory (what
`torch.cuda.mem_get_info` reports free, which a process cap also bounds, plus what this process already holds),
or refuses in one sentence.

Compiling the decoder layers costs seconds per distinct row length and saves time per token; it pays when
  tokens x saving per token > compile seconds.
Measured on the H200 with the 7B (same commands): a first compiled step of 10-19 s against ~0.5 s eager, each
further row length ~8 s; per token, bf16 eager 8.4k -> compiled 16.4k tok/s (58 us saved), lean eager 5.8k ->
compiled 12.3k tok/s (92 us saved). Savings scale with the model's parameters; compile cost is taken as fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.errors import UserError
from tunesmith.model.decoder import ModelConfig

GIB = 2**30
KEPT_BYTES = 7.6  # per token, layer and (hidden + intermediate) element, activations kept for backward, compiled
KEPT_BYTES_EAGER = 12.5  # the same, uncompiled
RECOMPUTE_FACTOR = 1.5  # lean's measured activations over its count of layer inputs + one layer rebuilt
CE_CHUNK = 512  # tokens per chunk of the lm_head + cross-entropy (train/loss.py)
MARGIN = 1.10  # the allocator's fragmentation and temporaries the count leaves out
HEADROOM_GIB = 0.5  # kept free on the device beyond the estimate
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits a weight, an 8-bit absmax per 64, fp32 per 256 of those

# compile economics, H200 7B measurements (module docstring)
COMPILE_FIRST_S = 20.0
COMPILE_PER_LENGTH_S = 8.0
SAVED_S_PER_TOKEN = {"bf16": 58e-6, "lean": 92e-6, "4bit": 58e-6, "4bit-lean": 92e-6}
REFERENCE_PARAMS = 7.6e9

MODES = ("bf16", "lean", "4bit", "4bit-lean")


@dataclass(frozen=True)
class Plan:
    mode: str
    checkpointing: bool
    quant_bits: int | None
    compile: bool
    estimate_gib: float
    budget_gib: float | None
    why: str

    def line(self) -> str:
        """The one line sft prints."""
        return f"plan: {self.mode}{', compiled' if self.compile else ''} — {self.why}"


def linear_params(cfg: ModelConfig) -> int:
    """Parameters of the decoder layers' projections (what LoRA targets and 4-bit quantizes)."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * cfg.num_heads * hd * 2 + h * cfg.num_kv_heads * hd * 2
    return cfg.num_layers * (attn + 3 * h * i)


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)


def total_params(cfg: ModelConfig) -> int:
    return linear_params(cfg) + embedding_params(cfg) + cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size


def lora_params(cfg: ModelConfig, rank: int) -> int:
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer = rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    return cfg.num_layers * per_layer


def estimate_gib(cfg: ModelConfig, mode: str, row_tokens: int, train_type: str = "lora", lora_rank: int = 8,
                 compiled: bool = False, dtype_bytes: int = 2) -> float:
    """Peak GPU memory of one training step of `mode` with rows of `row_tokens` tokens (module docstring)."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    embed_table = cfg.vocab_size * h * dtype_bytes
    if mode.startswith("4bit"):
        weights = linear_params(cfg) * NF4_BYTES + (total_params(cfg) - linear_params(cfg)) * dtype_bytes
        weights += 2 * max(3 * h * i // 3, h * cfg.num_heads * cfg.head_dim) * dtype_bytes  # a dequantized product
    else:
        weights = total_params(cfg) * dtype_bytes
    lean = mode.endswith("lean")
    if lean and not cfg.tie_embeddings and train_type == "lora":
        weights -= embed_table  # parked in CPU memory
    if train_type == "lora":
        trained = lora_params(cfg, lora_rank) * (4 + 4 + 4 + 4)  # fp32 A/B, gradient, two moments
    else:
        trained = total_params(cfg) * (dtype_bytes + 8)  # gradient + fp32 moments
    kept = KEPT_BYTES if compiled else KEPT_BYTES_EAGER
    per_token = (2 * L * h + kept * (h + i)) * RECOMPUTE_FACTOR if lean else kept * L * (h + i)
    logits = 2 * min(CE_CHUNK, row_tokens) * cfg.vocab_size * 4
    return (weights + trained + per_token * row_tokens + logits) * MARGIN / GIB


def compile_pays(mode: str, planned_tokens: float, row_lengths: int, params: int) -> bool:
    """Whether compiling the layers saves more time than it costs (module docstring)."""
    cost = COMPILE_FIRST_S + COMPILE_PER_LENGTH_S * max(0, row_lengths - 1)
    saved = planned_tokens * SAVED_S_PER_TOKEN[mode] * params / REFERENCE_PARAMS
    return saved > cost


def plan_run(cfg: ModelConfig, *, budget_gib: float | None, row_tokens: int, planned_tokens: float,
             row_lengths: int, train_type: str = "lora", lora_rank: int = 8, quant_bits: int | None = None,
             checkpointing: bool | None = None, compile: bool | None = None, on_gpu: bool = True) -> Plan:
    """The fastest mode whose estimate fits `budget_gib` (None: no limit, e.g. the CPU), honouring what the user
    fixed (`quant_bits`, `checkpointing`, `compile`: None = the planner's choice). Refuses in one sentence, naming
    the numbers and the flags that would fit, when nothing does."""
    if not on_gpu:
        mode = "4bit" if quant_bits == 4 else "bf16"
        return Plan(mode, bool(checkpointing), quant_bits, bool(compile), 0.0, None, "CPU: no memory plan")
    candidates = [m for m in MODES
                  if (quant_bits is None or (quant_bits == 4) == m.startswith("4bit"))
                  and (checkpointing is None or checkpointing == m.endswith("lean"))
                  and (train_type == "lora" or not m.startswith("4bit"))]
    params = total_params(cfg)
    compiles = {m: compile_pays(m, planned_tokens, row_lengths, params) if compile is None else compile
                for m in MODES}
    estimates = {m: estimate_gib(cfg, m, row_tokens, train_type, lora_rank, compiles[m]) for m in MODES}
    fits = [m for m in candidates if budget_gib is None or estimates[m] <= budget_gib]
    if not fits:
        wanted = ", ".join(f"{m} {estimates[m]:.1f}" for m in candidates)
        lora = {m: estimate_gib(cfg, m, row_tokens, "lora", lora_rank, compiles[m]) for m in MODES}
        would = next((m for m in MODES if lora[m] <= budget_gib), None)
        if would is None:
            advice = "use a smaller model, or shorten --max_length"
        else:
            flags = ([] if train_type == "lora" else ["--train_type lora"]) + FLAGS[would]
            advice = f"{' '.join(flags)} would fit ({would}, {lora[would]:.1f} GiB)"
        raise UserError(f"the run needs more GPU memory than the {budget_gib:.1f} GiB free: estimated {wanted} GiB "
                        f"for rows of {row_tokens} tokens; {advice}.")
    mode = fits[0]
    skipped = [m for m in MODES if MODES.index(m) < MODES.index(mode) and m in candidates]
    why = f"estimated {estimates[mode]:.1f} GiB"
    why += f" of {budget_gib:.1f} GiB free" if budget_gib is not None else ""
    if skipped:
        why += "; " + ", ".join(f"{m} would need {estimates[m]:.1f}" for m in skipped)
    why += f"; rows up to {row_tokens} tokens, {planned_tokens:,.0f} tokens planned"
    why += ", compiling pays" if compiles[mode] else ", too few tokens for compiling to pay"
    return Plan(mode, mode.endswith("lean"), 4 if mode.startswith("4bit") else None, compiles[mode],
                round(estimates[mode], 2), budget_gib, why)


FLAGS = {  # what selects each mode on the command line
    "bf16": ["--gradient_checkpointing false"],
    "lean": ["--gradient_checkpointing true"],
    "4bit": ["--quant_bits 4", "--gradient_checkpointing false"],
    "4bit-lean": ["--quant_bits 4", "--gradient_checkpointing true"],
}


def device_budget_gib(device) -> float | None:
    """What a run on this CUDA device may use, in GiB: its free memory plus what this process already holds (the
    model, when it is loaded before planning), less the headroom; None elsewhere."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return (free + torch.cuda.memory_reserved(device)) / GIB - HEADROOM_GIB
