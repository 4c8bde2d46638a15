"""Training throughput on the GPU: tunesmith vs HF transformers + PEFT, same shapes, same run. JSON lines out.

    PYTHONPATH=src python bench/train.py [--layers 28] [--steps 6] [--only tunesmith|hf] [--cases CASE ...]
                                         [--check] [--attention] [--profile CASE] [--full FULLCASE ...]

Random weights with Qwen2.5-7B-Instruct's exact shapes (speed does not depend on values), LoRA r8 alpha 32
all-linear, dropout 0, bf16, AdamW; 8,192 tokens per step. A case names its tokens and how they run, joined by +:
  1x2048 | 4x2048 | packed (short samples, 60-300 tokens, laid into 4 rows of 2048 with block-diagonal attention;
  HF runs them as padded batches of 16, its default collator) | short (the seed job's step: 8 x 110 tokens, 1 row)
  seq        rows one at a time with gradient accumulation, as `tunesmith sft` runs packed rows (else one batch)
  compile    compiled decoder layers (static shapes, FlexAttention for packed rows), as the trainer on long runs
  ckpt       torch's activation checkpointing of whole layers
  budgetX    AOTAutograd activation memory budget X (budget0: the trainer's lean mode with compiled layers)
  park       the embedding table in CPU memory (the trainer's lean mode)
  unstacked  compiled cases' LoRA A products one per module (else stacked where modules read the same input:
             lora.StackedLoRA, as the trainer)
  inplacece  compiled cases' lm_head/CE steps in place, uncompiled (else loss.logit_grad compiled, as the trainer)
  fused      q/k/v and gate/up through their fused matrices with the adapter stacked beside them
             (decode/static.FusedInputs; the trainer runs them module by module: 4x2048+compile, 16,700
             tok/s fused vs 16,726 module by module, 1.7 GiB more, 2026-12-01)
HF runs each case's counterpart (`baseline_case`: one batch; lean mode against HF's gradient checkpointing).
--check compares the fast paths with their references first (loss, LoRA gradients); --attention times attention
backends and the first call at new lengths; --profile CASE prints that case's GPU time per kernel and kind;
--full runs full fine-tuning cases (full-4x2048+compile, full-4x2048seq+ckpt+compile).
tokens/s is the median over measured steps after warm-up, counting real (non-pad) tokens; MFU uses ~29.5 GFLOP
per token (LoRA-7B at 2048; x1.5 for full fine-tuning) against 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

import torch
import torch._functorch.config  # noqa: F401
from kernels import gemm_shapes, profile

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu",
}
FLOP_PER_TOKEN = 29.5e9
PEAK = 989e12


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def short_samples(n_tokens: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lens, total = [], 0
    while total < n_tokens:
        n = rng.randint(60, 300)
        lens.append(n)
        total += n
    return lens


PROFILE: str | None = None  # --profile CASE: print where that case's step spends GPU time
RESIDENT = 0.0  # GiB allocated before a case's first step (weights; optimizer state after the first case)


def time_steps(step, steps: int, warmup: int = 2, case: str = "") -> tuple[float, float, float]:
    """(median seconds per step, peak GiB, seconds of the first step: compilation shows there)."""
    torch.cuda.reset_peak_memory_stats()
    global RESIDENT
    RESIDENT = torch.cuda.memory_allocated() / 2**30
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if case == PROFILE:
        profile(step, case)
        gemm_shapes(step, case)
    return statistics.median(times[warmup:]), torch.cuda.max_memory_allocated() / 2**30, times[0]


def measure(impl: str, case: str, step, tokens: int, steps: int, flop_scale: float = 1.0) -> dict:
    """Time `step` (tokens real tokens each), emit and return its JSON line; out of memory is a result too."""
    try:
        sec, mem, first = time_steps(step, steps, case=case if impl == "tunesmith" else "hf:" + case)
    except torch.OutOfMemoryError:
        rec = {"impl": impl, "case": case, "error": "OOM"}
    else:
        tps = tokens / sec
        rec = {"impl": impl, "case": case, "tokens_per_s": round(tps),
               "mfu": round(tps * FLOP_PER_TOKEN * flop_scale / PEAK, 3), "peak_gib": round(mem, 2),
               "resident_gib": round(RESIDENT, 2),
               "step_s": round(sec, 3), "first_step_s": round(first, 1)}
    emit(rec)
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def bench_tunesmith(cfg_dict: dict, steps: int, cases: list[str]) -> list[dict]:
    from tunesmith.data.packing import IGNORE
    from tunesmith.decode.static import fuse_projections
    from tunesmith.model.decoder import Decoder, ModelConfig
    from tunesmith.model.lora import LoraConfig, apply_lora, stack_lora_inputs
    from tunesmith.train.loss import chunked_cross_entropy_sum
    from tunesmith.train.optim import AdamW

    cfg = ModelConfig.from_hf(cfg_dict)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = Decoder(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    apply_lora(model, LoraConfig(8, 32, 0.0))
    emit({"impl": "tunesmith", "event": "init", "seconds": round(time.time() - t0, 1)})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW([{"params": params}], lr=1e-4)  # the trainer's (torch's fused kernel)
    out = []
    for case in cases:
        B, T = (1, 2048) if case.startswith("1x2048") else (4, 2048)
        if case.startswith("short"):  # the tutorial's seed step: 8 short samples packed into one row
            B, T = 1, 8 * 110
        ckpt = "+ckpt" in case
        fused_ce = "+compile" in case and "+inplacece" not in case
        if "+compile" in case:
            # A fresh compile per case: a second shape would otherwise recompile with dynamic shapes.
            # "+budgetX": AOTAutograd's activation memory budget (X = 0: recompute what it can in backward).
            torch._dynamo.reset()
            budget = next((float(t[6:]) for t in case.split("+") if t.startswith("budget")), 1.0)
            torch._functorch.config.activation_memory_budget = budget
            model.compile_layers(dynamic=False)  # as the trainer does; stays compiled for later cases
        if "+fused" in case:
            fuse_projections(model)
        elif "+unstacked" in case or "+compile" not in case:
            model.reset_inputs()
        else:
            stack_lora_inputs(model)  # as the trainer runs compiled LoRA
        if "+park" in case:  # lean mode's embedding table in CPU memory (Decoder.park_embeddings)
            model.park_embeddings("cpu")
        ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        pos, seq = None, None
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = IGNORE
        real = B * T
        if case.startswith(("packed", "short")):
            lens = short_samples(B * T) if case.startswith("packed") else [110] * 8
            # laid end to end over 4 rows of 2048; a sample crossing a row end is cut there
            flat_pos, flat_seq = [], []
            for k, n in enumerate(lens):
                flat_pos += list(range(n))
                flat_seq += [k] * n
            pos = torch.tensor(flat_pos[: B * T], device="cuda").view(B, T)
            seq = torch.tensor(flat_seq[: B * T], device="cuda").view(B, T)
            starts = torch.cat([torch.ones(B, 1, dtype=torch.bool, device="cuda"), seq[:, 1:] != seq[:, :-1]], 1)
            labels = labels.masked_fill(torch.roll(starts, -1, 1), IGNORE)

        # "seq": the B rows go through one at a time, each with its own backward (gradient accumulation), as
        # tunesmith's trainer runs packed rows; otherwise one (B, T) batch.
        parts = [slice(b, b + 1) for b in range(B)] if "seq" in case else [slice(0, B)]

        def step():
            n = int((labels != IGNORE).sum())
            for p in parts:
                h = model(ids[p], position_ids=None if pos is None else pos[p],
                          seq_ids=None if seq is None else seq[p], checkpoint=ckpt)
                (chunked_cross_entropy_sum(h, model.lm_head_weight, labels[p], fused=fused_ce) / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        out.append(measure("tunesmith", case, step, real, steps))
        model.park_embeddings("cuda")
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return out


def baseline_case(case: str) -> str:
    """The HF+PEFT case a tunesmith case is compared with: the same tokens per step, HF's way of running them
    (one batch; the lean mode against HF's gradient checkpointing)."""
    base = case.replace("seq", "").replace("+compile", "").replace("+park", "").replace("+fused", "").replace("+inplacece", "")
    return "+".join("ckpt" if t.startswith("budget") else t for t in base.split("+"))


def bench_full(cfg_dict: dict, steps: int, cases: list[str]) -> list[dict]:
    """Full fine-tuning: every weight trains (bf16 weights, gradients and AdamW states, fused AdamW), 4x2048."""
    from tunesmith.model.decoder import Decoder, ModelConfig
    from tunesmith.train.loss import chunked_cross_entropy_sum

    cfg = ModelConfig.from_hf(cfg_dict)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(cfg).to(torch.bfloat16)
    model.compile_layers(dynamic=False)  # as the trainer: a seq case after a batch case stays static
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (4, 2048), device="cuda")
    labels = torch.roll(ids, -1, 1)
    out = []
    for case in cases:
        ckpt = "+ckpt" in case
        parts = [slice(b, b + 1) for b in range(4)] if "seq" in case else [slice(0, 4)]

        def step():
            for p in parts:
                h = model(ids[p], checkpoint=ckpt)
                (chunked_cross_entropy_sum(h, model.lm_head_weight, labels[p], fused="+compile" in case)
                 / labels.numel()).backward()  # the CE step as the trainer's compiled runs make it
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        # full FT also computes weight gradients: ~1.5x the LoRA FLOPs per token
        out.append(measure("tunesmith", case, step, ids.numel(), steps, flop_scale=1.5))
        opt.zero_grad(set_to_none=True)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bench_attention(steps: int = 20) -> None:
    """Forward + backward of one layer's attention at 4x2048 (Qwen2.5-7B heads: 28 query, 4 KV, dim 128) on each
    backend this torch has; causal, and block-diagonal causal over packed short samples."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T, H, KV, D = 4, 2048, 28, 4, 128
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lens = short_samples(B * T)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[: B * T].view(B, T).cuda()
    dense = ((seq[:, :, None] == seq[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device="cuda").tril())[:, None]

    def doc_causal(b, h, qi, ki):
        return (seq[b, qi] == seq[b, ki]) & (qi >= ki)

    flex = torch.compile(flex_attention, dynamic=False)
    causal_bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T)
    doc_bm = create_block_mask(doc_causal, B, None, T, T)

    def run(name, fn):
        def once():
            fn().sum().backward()
        try:
            for _ in range(3):
                once()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                once()
            torch.cuda.synchronize()
            emit({"attention": name, "ms_fwd_bwd": round((time.perf_counter() - t) / steps * 1e3, 3)})
        except Exception as e:  # a backend that refuses these shapes says so and the rest still run
            emit({"attention": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})

    # First use of each new length (a short job's rows, a chat's prompts): SDPA's default backend (cuDNN on
    # Hopper, kernels built at run time) vs the prebuilt kernels tunesmith's eager path keeps to.
    from tunesmith.model.decoder import sdpa

    for label, backends in (("default", None), ("tunesmith eager", True)):
        for n in (301, 517, 1103):
            qs, ks, vs = (t[:1, :, :n].detach().clone().requires_grad_(True) for t in (q, k, v))
            m = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if backends:
                sdpa(qs, ks, vs, m).sum().backward()
                sdpa(qs, ks, vs, None).sum().backward()
            else:
                F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, enable_gqa=True).sum().backward()
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).sum().backward()
            torch.cuda.synchronize()
            emit({"attention": f"first call at length {n}, masked + causal, {label}",
                  "ms_fwd_bwd": round((time.perf_counter() - t0) * 1e3, 1)})

    kx = lambda t: t.repeat_interleave(H // KV, 1)  # noqa: E731  (backends without GQA see expanded heads)
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        with sdpa_kernel([be]):
            run(f"causal sdpa {be.name} gqa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            run(f"causal sdpa {be.name} expanded", lambda: F.scaled_dot_product_attention(q, kx(k), kx(v), is_causal=True))
            run(f"packed sdpa {be.name} expanded", lambda: F.scaled_dot_product_attention(q, kx(k), kx(v), attn_mask=dense))
    run("packed sdpa default gqa", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True))
    run("causal flex gqa", lambda: flex(q, k, v, block_mask=causal_bm, enable_gqa=True))
    run("packed flex gqa", lambda: flex(q, k, v, block_mask=doc_bm, enable_gqa=True))


def bench_check(cfg_dict: dict, layers: int = 2) -> None:
    """The fast paths against their references on the GPU, bf16, Qwen2.5-7B layer shapes (2 layers), one packed
    row of 2048 tokens, LoRA B randomized so every LoRA gradient is non-zero:
      reference: eager layers, SDPA with the dense block-diagonal mask, torch's checkpoint-free autograd, and
                 F.cross_entropy over the full logits;
      fast:      compiled layers (static shapes), FlexAttention block mask, chunked lm_head + CE with gradients
                 made in the forward, and the lean mode's zero activation budget.
    Emits the relative error (max |fast - ref| / max |ref|) of the loss and the worst LoRA gradient."""
    import torch.nn.functional as F

    from tunesmith.data.packing import IGNORE
    from tunesmith.decode.static import fuse_projections
    from tunesmith.model.decoder import Decoder, ModelConfig
    from tunesmith.model.lora import LoraConfig, apply_lora, lora_modules, stack_lora_inputs
    from tunesmith.train.loss import chunked_cross_entropy_sum

    cfg = ModelConfig.from_hf(dict(cfg_dict, num_hidden_layers=layers))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(cfg).to(torch.bfloat16)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.data.normal_(0.0, 0.02)
    model.requires_grad_(False)
    apply_lora(model, LoraConfig(8, 32, 0.0))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B["default"].weight.normal_(0.0, 0.01)
    T = 2048
    lens = short_samples(T)
    ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[:T].view(1, T).cuda()
    pos = torch.cat([torch.arange(n) for n in lens])[:T].view(1, T).cuda()
    labels = torch.roll(ids, -1, 1)
    starts = torch.cat([torch.ones(1, 1, dtype=torch.bool, device="cuda"), seq[:, 1:] != seq[:, :-1]], 1)
    labels = labels.masked_fill(torch.roll(starts, -1, 1), IGNORE)

    def run(fast: bool, budget: float = 1.0):
        model.zero_grad(set_to_none=True)
        with torch._functorch.config.patch(activation_memory_budget=budget):
            h = model(ids, position_ids=pos, seq_ids=seq)
        if fast:
            loss = chunked_cross_entropy_sum(h, model.lm_head_weight, labels, fused=True)
        else:
            loss = F.cross_entropy(model.logits(h).float().flatten(0, 1), labels.flatten(), reduction="sum",
                                   ignore_index=IGNORE)
        (loss / 1000).backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    def compare(name, a, b):
        rel = max(((a[1][n] - b[1][n]).abs().max() / b[1][n].abs().max()).item() for n in b[1])
        emit({"check": name, "loss_rel_err": abs(a[0] - b[0]) / abs(b[0]), "lora_grad_rel_err_max": round(rel, 4)})

    model.train()
    ref = run(False)
    again = run(False)
    compare("reference run twice (bf16 nondeterminism floor)", again, ref)
    model.compile_layers(dynamic=False)
    stack_lora_inputs(model)
    fast = run(True)
    compare("compiled + flex + fused lm_head/CE + stacked LoRA A products", fast, ref)
    fuse_projections(model)
    fused = run(True)
    compare("same + q/k/v and gate/up fused with their LoRA (decode/static.FusedInputs)", fused, ref)
    stack_lora_inputs(model)
    torch._dynamo.reset()
    model.compile_layers(dynamic=False)
    lean = run(True, budget=0.0)
    compare("lean: same + zero activation budget", lean, ref)
    torch._dynamo.reset()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def bench_hf(cfg_dict: dict, steps: int, cases: list[str]) -> list[dict]:
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(model, PeftLoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    emit({"impl": "hf+peft", "event": "init", "seconds": round(time.time() - t0, 1)})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out = []
    for case in cases:
        ckpt = "+ckpt" in case
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()
        model.train()
        if case.startswith("packed"):
            lens = short_samples(4 * 2048)
            batches = []
            for i in range(0, len(lens), 16):
                chunk = lens[i : i + 16]
                L = max(chunk)
                ids = torch.randint(0, cfg.vocab_size, (len(chunk), L), device="cuda")
                mask = torch.zeros(len(chunk), L, dtype=torch.long, device="cuda")
                for r, n in enumerate(chunk):
                    mask[r, :n] = 1
                batches.append((ids, mask, ids.masked_fill(mask == 0, -100)))
            real = sum(lens)

            def step():
                for ids, mask, labels in batches:
                    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            B, T = (1, 2048) if case.startswith("1x2048") else (4, 2048)
            ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
            real = B * T

            def step():
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        out.append(measure("hf+peft", case, step, real, steps))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28, help="decoder layers (28 = the real 7B)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per case (after 2 warm-up)")
    ap.add_argument("--only", choices=("tunesmith", "hf"), help="run one side only")
    ap.add_argument("--cases", nargs="*", default=["1x2048", "4x2048", "4x2048+ckpt", "packed", "packed+ckpt"])
    ap.add_argument("--full", nargs="*", default=[], help="full fine-tuning cases, e.g. full-4x2048+compile")
    ap.add_argument("--attention", action="store_true", help="also time attention backends alone")
    ap.add_argument("--check", action="store_true", help="first compare the fast paths with their references")
    ap.add_argument("--profile", metavar="CASE", help="per-kernel GPU time of this case (hf:CASE for the baseline)")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config settings for this run (A/B of compiler options), e.g. "
                         "coordinate_descent_tuning=True")
    a = ap.parse_args()
    import torch._inductor.config as inductor_config
    for kv in a.inductor:
        key, _, value = kv.partition("=")
        setattr(inductor_config, key, eval(value, {}))  # noqa: S307 (a benchmark's own command line)
        emit({"event": "inductor", key: getattr(inductor_config, key)})
    global PROFILE
    PROFILE = a.profile
    cfg = dict(QWEN25_7B, num_hidden_layers=a.layers)
    emit({"event": "env", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "layers": a.layers})
    if a.check:
        bench_check(cfg)
    if a.attention:
        bench_attention()
    ours = [] if a.only == "hf" or not a.cases else bench_tunesmith(cfg, a.steps, a.cases)
    if a.full:
        bench_full(cfg, a.steps, a.full)
    hf_cases = list(dict.fromkeys(baseline_case(c) for c in a.cases))  # HF's way of running the same tokens
    base = [] if a.only == "tunesmith" or not a.cases else bench_hf(cfg, a.steps, hf_cases)
    by_case = {r["case"]: r for r in base if "tokens_per_s" in r}
    for r in ours:
        b = by_case.get(baseline_case(r["case"]))
        if b and "tokens_per_s" in r:
            emit({"case": r["case"], "vs_hf_case": b["case"],
                  "speedup_vs_hf_peft": round(r["tokens_per_s"] / b["tokens_per_s"], 2),
                  "memory_ratio": round(r["peak_gib"] / b["peak_gib"], 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
