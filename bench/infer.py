"""Inference speed on the GPU: tunesmith vs HF transformers in the same run. JSON lines out.

    PYTHONPATH=src python bench/infer.py --model-dir DIR [--parts load decode server] [--layers 28]

DIR holds a Qwen2.5-7B-Instruct config.json and tokenizer files (from any Qwen2.5-7B-Instruct download; the
tokenizer files can also come from tests/qwen25_tiny.py's builder, which writes the same ones);
random bf16 weights of those exact shapes are written into it first when it has none (speed does not depend on
values). Parts:
  load    seconds to load the saved checkpoint onto the GPU, page cache warm: tunesmith's load_model vs
          transformers' from_pretrained(device_map="cuda").
  decode  batch 1, greedy, 256 new tokens (min_new_tokens so every run is 256 long), prompts of 64 and 1,024
          tokens: time to first token (prefill + first sample) and decode tok/s after it. tunesmith's Generator
          (static KV cache + CUDA-graph step) vs HF generate plain (dynamic cache) and with its static cache; also
          how many of the 256 greedy tokens the compiled path shares with tunesmith's eager dynamic-cache path.
  server  16 concurrent streamed /v1/completions requests (64-token prompts, 256 tokens each) through the real
          `tunesmith deploy` app (uvicorn + httpx): aggregate completion tok/s; beside it HF generate on a batch of
          the same 16 prompts.
With --json-schema, `decode` adds batch-1 decoding constrained to SCHEMA (a records array of 64+ objects, too long
to finish within --new tokens) beside the same run unconstrained, and `server` adds waves where every request
sends `response_format: json_schema` (SCHEMA), alternating with plain waves in the same server; each emits the
constrained / unconstrained tok/s ratio.
  steps   the CUDA-graph decode step alone, batch 1 and 16 rows: ms per step and a per-kernel profile, for each
          of --variants: tunesmith's kernels (slot attention, ops/gemv.py's one-row products), inductor's
          products, every product through ops/gemv.py, the masked attention reference, the kernels without
          programmatic dependent launch, one unmerged LoRA adapter (fused with q/k/v and gate/up, or module by
          module), two adapters mixed by row (lora.RowAdapters); --step-filled sets the cache slots filled.
  slots   the server's decode loop without the server: DecodeSlots of 16 rows x 2,048 slots driven from one thread
          (16 64-token prompts, 256 tokens each): aggregate tok/s, host time per step, and a cProfile of the loop.
  gemv    batch-1 matrix-vector products of every Qwen2.5-7B shape (each weight read from HBM, not L2): cuBLAS,
          inductor's coordinate-descent reduction (what a compiled step used), and ops/gemv_kernels.py's Triton
          kernel over a grid of tile shapes; TB/s of weights read.
  attention  decode attention alone (28 layers' worth in one CUDA graph) over caches with few and many slots
          filled: the slot kernel at several block sizes vs the masked reference, microseconds per layer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

NEW = 256
DEVICE = "cuda"
JSON_SCHEMA = False
# What constrained waves ask for: at least 64 records of three typed fields, so no answer can complete (and stop)
# before NEW tokens, whatever random weights pick.
SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 16},
                                     "ok": {"type": "boolean"}},
    "required": ["id", "name", "ok"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False}


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sync_time(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def write_weights(model_dir: Path, layers: int) -> None:
    """Random bf16 weights in HF naming (tunesmith's parameter names are HF's), 4 GB shards + index."""
    from safetensors.torch import save_file

    from tunesmith.model.decoder import Decoder, ModelConfig

    cfg_dict = json.loads((model_dir / "config.json").read_text())
    cfg_dict["num_hidden_layers"] = layers
    (model_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Decoder(ModelConfig.from_hf(cfg_dict)).to(torch.bfloat16)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.data.normal_(0.0, 0.02)
    state = {k: v for k, v in model.state_dict().items() if k != "inv_freq"}
    shards, cur, size, index = [], {}, 0, {}
    for k, v in state.items():
        if size + v.numel() * 2 > 4e9 and cur:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * 2
    shards.append(cur)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()}, str(model_dir / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
    total = sum(v.numel() * 2 for v in state.values())
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    del model, state, shards, cur
    free()
    emit({"event": "weights_written", "gb": round(total / 1e9, 2), "seconds": round(time.time() - t0, 1)})


def warm_page_cache(model_dir: Path) -> None:
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def gib() -> float:
    return round(torch.cuda.memory_allocated() / 2**30, 1) if DEVICE == "cuda" else 0.0


def bench_load(model_dir: Path) -> None:
    import transformers

    from tunesmith.model.load import load_model

    warm_page_cache(model_dir)
    for rep in range(2):
        s, lm = sync_time(lambda: load_model(str(model_dir), "bfloat16", DEVICE))
        emit({"part": "load", "impl": "tunesmith", "rep": rep, "seconds": round(s, 2),
              "gib": gib()})
        del lm
        free()
    for rep in range(2):
        s, m = sync_time(lambda: transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.bfloat16, device_map=DEVICE))
        emit({"part": "load", "impl": "hf", "rep": rep, "seconds": round(s, 2)})
        del m
        free()


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150000, (n,), generator=g).tolist()


def bench_decode(model_dir: Path, runs: int, skip_hf: bool) -> None:
    import transformers

    from tunesmith.decode.generator import Generator
    from tunesmith.decode.sampling import SamplingConfig
    from tunesmith.model.load import load_model

    lm = load_model(str(model_dir), "bfloat16", DEVICE)
    fast, plain = Generator(lm), Generator(lm, compiled=False)
    first = SamplingConfig(max_new_tokens=1, temperature=0.0)
    full = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW, temperature=0.0)
    if not skip_hf:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16,
                                                               device_map=DEVICE)
        hf.generation_config.eos_token_id = lm.eos_token_ids
        hf.generation_config.pad_token_id = 0
    results = {}
    for plen in (64, 1024):
        ids = prompt_ids(plen, plen)
        t0 = time.perf_counter()
        fast.complete(ids, full)  # warm-up: compiles and records the CUDA graph
        emit({"part": "decode", "impl": "tunesmith", "prompt": plen, "event": "warmup",
              "seconds": round(time.perf_counter() - t0, 1)})
        for name, gen, n in (("tunesmith", fast, runs), ("tunesmith-eager", plain, 1)):
            ttft = statistics.median(sync_time(lambda: gen.complete(ids, first))[0] for _ in range(n))
            total, out = min((sync_time(lambda: gen.complete(ids, full)) for _ in range(n)), key=lambda x: x[0])
            assert out.completion_tokens == NEW, out.completion_tokens
            results[(name, plen)] = out.token_ids
            emit({"part": "decode", "impl": name, "prompt": plen, "new": NEW, "ttft_ms": round(ttft * 1000, 1),
                  "decode_tok_s": round((NEW - 1) / (total - ttft), 1), "total_s": round(total, 3)})
        # Random weights give nearly flat logits, so free-running greedy paths part at the first near-tie; the
        # check that means something is teacher-forced: the eager model's argmax along the compiled answer.
        got = results[("tunesmith", plen)]
        with torch.inference_mode():
            h = lm.model(torch.tensor([ids + got[:-1]], device=DEVICE))[0, plen - 1 :]
            top = lm.model.logits(h).float().topk(2)
        agree = top.indices[:, 0].cpu() == torch.tensor(got)
        clear = (top.values[:, 0] - top.values[:, 1]).cpu() > 0.05
        emit({"part": "decode", "check": "eager argmax along the compiled greedy answer", "prompt": plen,
              "agree": int(agree.sum()), "of": NEW, "agree_where_top2_gap_gt_0.05": int((agree & clear).sum()),
              "gap_gt_0.05": int(clear.sum()), "first_free_running_difference": next(
                  (i for i, (a, b) in enumerate(zip(got, results[("tunesmith-eager", plen)])) if a != b), NEW)})
        if JSON_SCHEMA:
            bench_decode_schema(lm, fast, ids, full, runs)
        if skip_hf:
            continue
        x = torch.tensor([ids], device=DEVICE)
        for name, extra in (("hf-plain", {}), ("hf-static", {"cache_implementation": "static"})):
            kw = dict(do_sample=False, **extra)
            with torch.inference_mode():
                hf.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, **kw)  # warm-up (compiles for static)
                ttft = statistics.median(
                    sync_time(lambda: hf.generate(x, max_new_tokens=1, **kw))[0] for _ in range(runs))
                total, out = min((sync_time(lambda: hf.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, **kw))
                                  for _ in range(runs)), key=lambda r: r[0])
            toks = out[0, plen:].tolist()
            same = next((i for i, (a, b) in enumerate(zip(toks, results[("tunesmith", plen)])) if a != b), NEW)
            emit({"part": "decode", "impl": name, "prompt": plen, "new": len(toks), "ttft_ms": round(ttft * 1000, 1),
                  "decode_tok_s": round((NEW - 1) / (total - ttft), 1), "total_s": round(total, 3),
                  "same_greedy_prefix_as_tunesmith": same})
    del lm, fast, plain
    hf = None
    free()


def bench_decode_schema(lm, gen, ids: list[int], full, runs: int) -> None:
    """Batch-1 decode tok/s constrained to SCHEMA vs unconstrained, alternating in one run (the mask is filled
    on the host while the device runs the step's forward)."""
    from dataclasses import replace

    from tunesmith.decode.grammar import grammars_for

    grammar = grammars_for(lm.tokenizer, lm.model.config.vocab_size, lm.eos_token_ids).json_schema(SCHEMA)
    constrained = replace(full, grammar=grammar)
    first = replace(full, max_new_tokens=1, min_new_tokens=1)
    gen.complete(ids, constrained)  # warm-up of the masked path
    best = {}
    for _ in range(runs):
        for name, cfg in (("plain", full), ("json_schema", constrained)):
            ttft = sync_time(lambda: gen.complete(ids, replace(first, grammar=cfg.grammar)))[0]
            total, out = sync_time(lambda: gen.complete(ids, cfg))
            assert out.completion_tokens == NEW, out.completion_tokens
            rate = (NEW - 1) / (total - ttft)
            if rate > best.get(name, (0,))[0]:
                best[name] = (rate, ttft, out.text)
    assert best["json_schema"][2].startswith('{"records"'), best["json_schema"][2][:80]  # a prefix of SCHEMA's JSON
    for name, (rate, ttft, text) in best.items():
        emit({"part": "decode", "impl": "tunesmith", "response_format": name, "prompt": len(ids), "new": NEW,
              "ttft_ms": round(ttft * 1000, 1), "decode_tok_s": round(rate, 1),
              **({"text_head": text[:80]} if name == "json_schema" else {})})
    emit({"part": "decode", "check": "batch-1 json_schema / plain decode tok/s", "prompt": len(ids),
          "ratio": round(best["json_schema"][0] / best["plain"][0], 3)})


def greedy_inputs(g, rows: int) -> list[torch.Tensor]:
    """The step's inputs for its greedy picks (StaticDecoder.step) as a plain greedy batch has them: end tokens,
    nothing blocked, no penalty."""
    vocab = g.model.config.vocab_size
    eos = torch.zeros(vocab, dtype=torch.bool, device=DEVICE)
    eos[g.lm.eos_token_ids] = True
    t = [eos, torch.zeros(rows, 1, dtype=torch.bool, device=DEVICE), torch.zeros(rows, vocab, dtype=torch.bool,
         device=DEVICE), torch.ones(rows, 1, device=DEVICE)]
    g.mark_static(t)
    return t


ALL_ROLES = frozenset({"qkv", "o", "gate_up", "down", "lm_head"})
STEP_VARIANTS = {  # name: (the step's kernels, LoRA)
    "kernels": ("shipped", None),  # what tunesmith runs: decode/static.Kernels()
    "kernels without PDL": ({"pdl": False}, None),  # as "kernels", launched one after another
    "rope by inductor": ({"rope_write": False}, None),  # as "kernels", with ops/rope_write.py off
    "inductor products": ({"gemv_roles": frozenset()}, None),
    "every product through gemv": ({"gemv_roles": ALL_ROLES}, None),
    "masked reference": ({"attention": False, "gemv_roles": frozenset()}, None),
    # random r=8 all-linear adapters, unmerged: one active for every row, or two with rows alternating between
    # them through lora.RowAdapters (what a server with several adapters runs)
    "one LoRA adapter": ("shipped", "one"),
    "one LoRA adapter, module by module": ({"fuse_lora": False}, "one"),
    "two LoRA adapters by row": ("shipped", "rows"),
}


def bench_steps(model_dir: Path, streams: int, row_counts: list[int], variants: list[str],
                filled: list[int]) -> None:
    """The decode step alone, as its CUDA graph replays: ms per step and where its GPU time goes, at batch 1
    (Generator's 4,096-slot cache) and at `streams` rows of 2,048 slots (the server part's shape), `filled` slots;
    each variant (STEP_VARIANTS: which kernels the step uses) a fresh compile, same inputs, logits compared."""
    from kernels import profile

    from tunesmith.decode.generator import Generator
    from tunesmith.decode.slots import cudagraph_thread_setup
    from tunesmith.decode.static import Kernels
    from tunesmith.model.load import load_model
    from tunesmith.model.lora import LoraConfig, RowAdapters, apply_lora, lora_modules, set_active_adapter

    lm = load_model(str(model_dir), "bfloat16", DEVICE)
    emb = lm.model.model.embed_tokens.weight
    embed_bytes = 0 if lm.model.config.tie_embeddings else emb.numel() * emb.element_size()  # one row read a step
    read = sum(p.numel() * p.element_size() for p in lm.model.parameters()) - embed_bytes
    logits = {}
    for variant in variants:
        changes, lora = STEP_VARIANTS[variant]
        kernels = Kernels() if changes == "shipped" else Kernels(**changes)
        if lora and not lora_modules(lm.model):
            for name in ("a0", "a1"):
                apply_lora(lm.model, LoraConfig(r=8, alpha=32, dropout=0.0), name,
                           targets=[n for n, _ in lora_modules(lm.model)] or None)
            for _, m in lora_modules(lm.model):
                for B in m.lora_B.values():
                    torch.nn.init.normal_(B.weight, 0.0, 0.01)
        set_active_adapter(lm.model, "a0" if lora else None)
        torch._dynamo.reset()
        g = Generator(lm, kernels=kernels)
        cudagraph_thread_setup()
        for rows, slots, fill in ((n, g.static_len if n == 1 else 2048, f) for n in row_counts for f in filled):
            if lora == "rows":
                mixed = RowAdapters(lm.model, rows, DEVICE, torch.bfloat16)
                mixed.assign([f"a{b % 2}" for b in range(rows)])
                set_active_adapter(lm.model, mixed)
            cache = g.static_cache(rows, slots)
            tok = torch.ones(rows, 1, dtype=torch.long, device=DEVICE)
            pos = torch.full((rows, 1), min(fill, slots - 2), device=DEVICE)
            label = f"decode step, {rows} row(s) x {slots} slots, {fill} filled, {variant}"
            picks = greedy_inputs(g, rows)
            with torch.inference_mode():
                step = lambda: g.compiled_step(tok, pos, cache, *picks)[0]  # noqa: E731
                compile_s = sync_time(lambda: [step() for _ in range(3)])[0]  # compiles, records the graph
                ms = sync_time(lambda: [step() for _ in range(100)])[0] * 10
                logits[(variant, rows, fill)] = step().float().clone()
                emit({"part": "steps", "case": label, "graph_step_ms": round(ms, 3), "compile_s": round(compile_s, 1),
                      "weights_read_tb_per_s": round(read / 1e9 / ms, 2)})
                if DEVICE == "cuda":
                    profile(step, label, steps=20, top=12 if len(variants) > 1 else 40)
            del cache
            free()
        del g
    set_active_adapter(lm.model, None)
    for variant in variants[1:]:  # the caches hold the same keys (written by the same steps): same logits
        if STEP_VARIANTS[variant][1] or STEP_VARIANTS[variants[0]][1]:
            continue  # an adapter changes the logits
        for rows, fill in ((n, f) for n in row_counts for f in filled):
            a, b = logits[(variants[0], rows, fill)], logits[(variant, rows, fill)]
            emit({"part": "steps", "check": f"{variants[0]} vs {variant}, last step's logits", "rows": rows,
                  "filled": fill,
                  "max_abs_diff": round((a - b).abs().max().item(), 4), "logit_scale": round(b.abs().max().item(), 2),
                  "same_argmax": int((a.argmax(-1) == b.argmax(-1)).sum()), "of": rows})


def drive_alone(batch, prompts: list[list[int]], cfg) -> dict:
    """Every prompt through a DecodeSlots from this thread (NEW tokens each): wall time and per-step figures."""
    counters0 = batch.steps, batch.step_seconds, batch.wait_seconds, batch.launch_seconds
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        batch.join(i, ids, cfg)
    while batch.active:
        batch.step()
    wall = time.perf_counter() - t0
    steps, busy, wait, launch = (b - a for a, b in zip(counters0, (
        batch.steps, batch.step_seconds, batch.wait_seconds, batch.launch_seconds)))
    return {"wall_s": round(wall, 2), "aggregate_tok_s": round(len(prompts) * NEW / wall, 1), "decode_steps": steps,
            "ms_per_step_in_engine": round(busy / steps * 1000, 2),
            "ms_per_step_waiting_for_gpu": round(wait / steps * 1000, 2),
            "ms_per_step_launching_the_graph": round(launch / steps * 1000, 2)}


def bench_slots(model_dir: Path, streams: int) -> None:
    import cProfile
    import pstats

    from tunesmith.decode.generator import Generator
    from tunesmith.decode.sampling import SamplingConfig
    from tunesmith.decode.slots import DecodeSlots
    from tunesmith.model.load import load_model

    lm = load_model(str(model_dir), "bfloat16", DEVICE)
    batch = DecodeSlots(Generator(lm), streams, 2048)
    cfg = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW, temperature=0.0)
    prompts = [prompt_ids(64, 1000 + i) for i in range(streams)]
    prof = cProfile.Profile()
    for rep in range(3):  # the first compiles the step
        if rep == 2:
            prof.enable()
        figures = drive_alone(batch, prompts, cfg)
        prof.disable()
        emit({"part": "slots", "rep": rep, "streams": streams, "profiled": rep == 2, **figures})
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    # Host waits for the GPU inside the loop undo its pipelining (two were found this way, 2026-11-29): count what
    # torch's sync debug mode reports over a wave of greedy, sampled and penalized answers (0 expected).
    import warnings

    from tunesmith.decode.grammar import grammars_for

    grammar = grammars_for(lm.tokenizer, lm.model.config.vocab_size, lm.eos_token_ids).json_schema(SCHEMA)
    mixed = [cfg, SamplingConfig(max_new_tokens=16, min_new_tokens=8, temperature=0.8, top_p=0.9, top_k=50,
                                 repetition_penalty=1.1, seed=1),
             SamplingConfig(max_new_tokens=16, grammar=grammar, logprobs=5, presence_penalty=0.5,
                            frequency_penalty=0.5, logit_bias=((5, 1.0),))]
    for i, ids in enumerate(prompts):
        batch.join(i, ids, mixed[i % 3])
    batch.step()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        for _ in range(8):
            batch.step()
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    emit({"part": "slots", "check": f"host waits for the GPU in 8 steps of {streams} mixed answers (greedy; "
                                    "sampled; json_schema + logprobs + penalties + logit_bias)", "syncs": len(syncs),
          "sync_messages": sorted(set(syncs))[:5]})
    while batch.active:
        batch.step()


def bench_attention() -> None:
    """Decode attention alone: 28 layers' caches (Qwen2.5-7B: 28 query heads, 4 KV heads, head_dim 128), one CUDA
    graph of 28 calls, replayed; the rows' filled lengths vary by a few slots around the stated one."""
    from tunesmith.decode.static import decode_attention as reference
    from tunesmith.ops import decode_attention as da

    H, n_kv, hd, layers = 28, 4, 128, 28
    assert da.load_kernels(), "triton is not installed"
    for rows, slots, filled in ((1, 4096, 300), (1, 4096, 1300), (1, 4096, 4000), (16, 2048, 300), (16, 2048, 2000),
                                (16, 8192, 320)):
        ks = [torch.randn(rows, n_kv, slots, hd, device=DEVICE, dtype=torch.bfloat16) for _ in range(layers)]
        vs = [torch.randn_like(k) for k in ks]
        q = torch.randn(rows, H, 1, hd, device=DEVICE, dtype=torch.bfloat16)
        hi = (filled - 1 - torch.arange(rows, device=DEVICE) % 8).clamp(min=0)
        span = da.SlotRange(torch.zeros_like(hi), hi)
        mask = (torch.arange(slots, device=DEVICE)[None, :] <= hi[:, None])[:, None, None, :]
        want = reference(q, ks[0], vs[0], mask).float()
        variants = {"masked reference": lambda k, v: reference(q, k, v, mask)}
        for block_n in (32, 64, 128):
            for splits in (None, 4, 16):
                variants[f"slot kernel block {block_n} splits {splits or 'auto'}"] = (
                    lambda k, v, b=block_n, s=splits: da.attend(q, k, v, span, block_n=b, splits=s))
        for name, fn in variants.items():
            err = (fn(ks[0], vs[0]).float() - want).abs().max().item()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for k, v in zip(ks, vs):
                    fn(k, v)
            graph.replay()
            us = sync_time(lambda: [graph.replay() for _ in range(20)])[0] / 20 / layers * 1e6
            emit({"part": "attention", "rows": rows, "slots": slots, "filled": filled, "impl": name,
                  "us_per_layer": round(us, 1), "max_abs_diff_vs_reference": round(err, 4)})
            del graph
        del ks, vs
        free()


def bench_gemv() -> None:
    import torch._inductor.config as inductor
    import torch.nn.functional as F

    from tunesmith.ops import decode_attention, gemv, gemv_kernels

    decode_attention.load_kernels()
    inductor.coordinate_descent_tuning = True
    shapes = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
              "lm_head": (152064, 3584)}
    per_token = {"qkv": 28, "o": 28, "gate_up": 28, "down": 28, "lm_head": 1}
    configs = [(bn, bk, wp, st) for bn in (2, 4, 8, 16) for bk in (512, 1024) for wp in (4, 8) for st in (1, 3)]
    best_ms = {}
    for name, (N, K) in shapes.items():
        copies = max(2, -(-600_000_000 // (N * K * 2)))  # > the 50 MB L2 many times over
        ws = [torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16)
        want = F.linear(x.float(), ws[0].float())
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, w: F.linear(x, w), dynamic=False)
        impls = {"cublas": lambda w: F.linear(x, w), "inductor": lambda w: compiled(x, w)}
        for cfg in configs:
            impls["triton bn%d bk%d w%d s%d" % cfg] = lambda w, c=cfg: gemv_kernels.launch(x, w, None, *c)
        # what ops/gemv.py ships, launched with programmatic dependent launch: in the graph below the products are
        # back to back, each streaming its first tile in while the one before finishes
        impls["shipped tiles, PDL"] = lambda w: gemv_kernels.launch(x, w, None, *gemv.tiles(N, K), pdl=True)
        results = []
        for impl, fn in impls.items():
            try:
                err = (fn(ws[0]).float() - want).abs().max().item()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for w in ws:
                        fn(w)
                graph.replay()
                t = sync_time(lambda: [graph.replay() for _ in range(10)])[0] / 10 / copies
                del graph
            except Exception as e:  # a tile shape this GPU cannot run
                emit({"part": "gemv", "shape": name, "impl": impl, "error": str(e)[:200]})
                continue
            results.append((t, impl, err))
        results.sort()
        keep = ("cublas", "inductor", "shipped tiles, PDL", "triton bn%d bk%d w%d s%d" % gemv.tiles(N, K))
        for t, impl, err in results[:6] + [r for r in results[6:] if r[1] in keep]:
            emit({"part": "gemv", "shape": name, "N": N, "K": K, "impl": impl, "us": round(t * 1e6, 1),
                  "tb_per_s": round(N * K * 2 / t / 1e12, 2), "max_abs_diff": round(err, 4)})
        best_ms[name] = {impl: t * 1e3 for t, impl, _ in results}
        del ws
        free()
    for impl in ("cublas", "inductor"):
        emit({"part": "gemv", "per_token_ms": impl,
              "ms": round(sum(best_ms[s][impl] * per_token[s] for s in shapes), 3)})
    emit({"part": "gemv", "per_token_ms": "best triton per shape",
          "ms": round(sum(min(v for k, v in best_ms[s].items() if k.startswith("triton")) * per_token[s]
                          for s in shapes), 3)})
    for impl, pick in (("shipped tiles", lambda s: "triton bn%d bk%d w%d s%d" % gemv.tiles(*shapes[s])),
                       ("shipped tiles, PDL", lambda s: "shipped tiles, PDL")):
        emit({"part": "gemv", "per_token_ms": impl, "ms": round(sum(best_ms[s][pick(s)] * per_token[s] for s in shapes), 3)})


def client_wave(url: str, prompts: list[list[int]], new: int = NEW, schema: dict | None = None
                ) -> tuple[float, list[tuple[int, float]]]:
    """All prompts at once as streamed /v1/completions requests (with `schema`, each sends it as its
    response_format): (wall seconds, [(completion tokens, seconds to the first token)])."""
    import httpx

    async def one(client, ids) -> tuple[int, float]:
        body = {"prompt": ids, "max_tokens": new, "min_tokens": new, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "records", "schema": schema}}
        t0, first, tokens = time.perf_counter(), None, 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices"):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return tokens, first or 0.0

    async def wave():
        async with httpx.AsyncClient(timeout=600) as client:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(client, p) for p in prompts))
            return time.perf_counter() - t0, res

    return asyncio.run(wave())


def bench_server(model_dir: Path, streams: int, skip_hf: bool) -> None:
    import httpx
    import uvicorn

    from tunesmith.args import DeployArgs
    from tunesmith.serve.app import create_app
    from tunesmith.session import load_for_generation

    # HF first: CUDA-graph trees keep per-thread state, and the server's engine thread must not be the first user
    prompts = [prompt_ids(64, 1000 + i) for i in range(streams)]
    import transformers

    hf = None if skip_hf else transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16, device_map=DEVICE)
    x = torch.tensor(prompts, device=DEVICE)
    for name, extra in () if skip_hf else (("hf-plain", {}), ("hf-static", {"cache_implementation": "static"})):
        hf.generation_config.pad_token_id = 0
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **extra)
            wall, out = sync_time(lambda: hf.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                                      **extra))
        tokens = (out.shape[1] - 64) * streams
        emit({"part": "server", "impl": f"{name} generate batch {streams}", "completion_tokens": tokens,
              "wall_s": round(wall, 2), "aggregate_tok_s": round(tokens / wall, 1)})

    del hf
    free()

    args = DeployArgs(model=str(model_dir), torch_dtype="bfloat16", device=DEVICE, max_num_seqs=streams,
                      max_concurrency=64, max_model_len=2048)
    app = create_app(lambda: load_for_generation(args), args)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "server did not become ready"
        time.sleep(0.5)
    batch = app.state.backend.engine.batch

    import concurrent.futures
    import multiprocessing

    # The clients run in a process of their own, as real clients do: in this one they would take the GIL from the
    # server's threads (engine, HTTP) they are measuring.
    clients = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    # The first wave runs with the server's own GIL hand-over interval (0.5 ms); the others try shorter and the
    # default, since the engine thread and the HTTP thread share one GIL.
    for rep, switch in enumerate((None, None, 0.0001, 0.005)):
        if switch is not None:
            sys.setswitchinterval(switch)
        counters0 = batch.steps, batch.step_seconds, batch.wait_seconds, batch.launch_seconds
        wall, res = clients.submit(client_wave, url, prompts, NEW).result()
        tokens = sum(t for t, _ in res)
        steps, busy, wait, launch = (b - a for a, b in zip(counters0, (
            batch.steps, batch.step_seconds, batch.wait_seconds, batch.launch_seconds)))
        per_step = lambda x: round(x / max(steps, 1) * 1000, 2)  # noqa: E731
        emit({"part": "server", "impl": "tunesmith deploy", "rep": rep, "streams": streams,
              "switch_interval_ms": sys.getswitchinterval() * 1000,
              "completion_tokens": tokens, "wall_s": round(wall, 2), "aggregate_tok_s": round(tokens / wall, 1),
              "median_ttft_ms": round(statistics.median(f for _, f in res) * 1000, 1), "decode_steps": steps,
              "ms_per_step_in_engine": per_step(busy), "ms_per_step_waiting_for_gpu": per_step(wait),
              "ms_per_step_launching_the_graph": per_step(launch), "share_of_wall_in_steps": round(busy / wall, 2)})
    if JSON_SCHEMA:  # plain and constrained waves alternating, at the server's own hand-over interval
        sys.setswitchinterval(0.0005)
        best: dict[str, float] = {}
        for rep in range(4):
            name = ("plain", "json_schema")[rep % 2]
            counters0 = batch.steps, batch.step_seconds, batch.wait_seconds
            wall, res = clients.submit(client_wave, url, prompts, NEW, SCHEMA if name == "json_schema" else None
                                       ).result()
            tokens = sum(t for t, _ in res)
            assert tokens == NEW * streams, (name, tokens)  # every answer ran its full length
            steps, busy, wait = (b - a for a, b in zip(counters0, (batch.steps, batch.step_seconds,
                                                                  batch.wait_seconds)))
            best[name] = max(best.get(name, 0.0), tokens / wall)
            emit({"part": "server", "impl": "tunesmith deploy", "response_format": name, "rep": rep // 2,
                  "streams": streams, "completion_tokens": tokens, "wall_s": round(wall, 2),
                  "aggregate_tok_s": round(tokens / wall, 1),
                  "median_ttft_ms": round(statistics.median(f for _, f in res) * 1000, 1), "decode_steps": steps,
                  "ms_per_step_in_engine": round(busy / max(steps, 1) * 1000, 2),
                  "ms_per_step_waiting_for_gpu": round(wait / max(steps, 1) * 1000, 2)})
        emit({"part": "server", "check": f"{streams}-stream json_schema / plain aggregate tok/s",
              "ratio": round(best["json_schema"] / best["plain"], 3)})
    clients.shutdown()
    server.should_exit = True
    time.sleep(2)
    app.state.backend.engine.stop()
    # The same DecodeSlots (its compiled step) driven from this thread alone, no HTTP: what the engine can do.
    from tunesmith.decode.sampling import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW, temperature=0.0)
    for rep in range(2):
        emit({"part": "server", "impl": "the server's DecodeSlots alone (no HTTP)", "rep": rep, "streams": streams,
              **drive_alone(batch, prompts, cfg)})



def main() -> None:
    global DEVICE, JSON_SCHEMA, NEW
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--parts", nargs="+", default=["load", "decode", "server"])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--step-rows", type=int, nargs="+", default=None, help="steps part: rows (default 1 and --streams)")
    ap.add_argument("--step-filled", type=int, nargs="+", default=[300], help="steps part: cache slots filled")
    ap.add_argument("--variants", nargs="+", default=["kernels", "masked reference"], choices=list(STEP_VARIANTS),
                    help="steps part: which kernels the compiled step uses (one variant: a longer profile)")
    ap.add_argument("--no-hf", action="store_true", help="tunesmith only (the HF baselines were measured before)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the bench itself on a tiny model")
    ap.add_argument("--json-schema", action="store_true",
                    help="decode and server parts: also constrained to SCHEMA, beside the plain figures")
    ap.add_argument("--new", type=int, default=NEW, help="tokens per answer (decode, server, slots parts)")
    a = ap.parse_args()
    DEVICE, JSON_SCHEMA, NEW = a.device, a.json_schema, a.new
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    emit({"event": "start", "device": name, "torch": torch.__version__, "parts": a.parts})
    if not list(a.model_dir.glob("*.safetensors")):
        write_weights(a.model_dir, a.layers)
    for part in a.parts:
        t0 = time.time()
        {"load": lambda: bench_load(a.model_dir), "decode": lambda: bench_decode(a.model_dir, a.runs, a.no_hf),
         "server": lambda: bench_server(a.model_dir, a.streams, a.no_hf),
         "steps": lambda: bench_steps(a.model_dir, a.streams, a.step_rows or [1, a.streams], a.variants,
                                             a.step_filled), "attention": bench_attention,
         "gemv": bench_gemv,
         "slots": lambda: bench_slots(a.model_dir, a.streams)}[part]()
        emit({"event": "part_done", "part": part, "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
