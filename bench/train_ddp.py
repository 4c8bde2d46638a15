"""Data-parallel training on several GPUs: tunesmith's own loop (Trainer.train_step, as `NPROC_PER_NODE=N
tunesmith sft` runs it) on Qwen2.5-7B shapes, first on 1 GPU, then on N under torchrun. JSON lines out.

    PYTHONPATH=src python bench/train_ddp.py --gpus 2                         # LoRA r8 all-linear under DDP
    PYTHONPATH=src python bench/train_ddp.py --gpus 2 --train_type full       # full fine-tuning under FSDP2

Random weights with Qwen2.5-7B-Instruct's shapes (speed does not depend on values), bf16, dropout 0, AdamW.
Weak scaling: each GPU runs the same work per optimizer step in both runs (--rows rows of --seq tokens: 2048-token
samples, or packed 60-300-token samples with --case packed), so the ideal per-GPU throughput at N GPUs equals the
1-GPU one, and scaling efficiency = (tokens/s per GPU at N) / (tokens/s at 1); the target is >= 0.90.
Both runs are child processes of this one (the 1-GPU run plain, the N-GPU run through torchrun), so neither
holds memory while the other runs. tokens/s is the median over measured steps after warm-up (which includes the
per-layer torch.compile); peak memory is torch.cuda.max_memory_allocated, the largest over the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu",
}


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def random_samples(n: int, lengths: list[int], vocab: int, seed: int = 0):
    """n samples cycling through `lengths`, every token supervised; the same list on every rank (the loop slices
    each step's samples by rank, as it does with real data)."""
    from tunesmith.data.packing import IGNORE, Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(vocab) for _ in range(lengths[i % len(lengths)])]
        out.append(Sample(ids, ids[1:] + [IGNORE]))
    return out


def worker(a) -> None:
    """One measurement: this process alone (1 GPU), or one rank of a torchrun job."""
    from tunesmith.args import SftArgs
    from tunesmith.model.decoder import Decoder, ModelConfig
    from tunesmith.model.load import LoadedModel
    from tunesmith.train import distributed
    from tunesmith.train.loop import Trainer, resolve_defaults

    device = distributed.setup(torch.device("cuda"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = ModelConfig.from_hf(dict(QWEN25_7B, num_hidden_layers=a.layers))
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(device):
        model = Decoder(cfg).to(torch.bfloat16)
    model.eval().requires_grad_(False)
    init_s = time.time() - t0
    lm = LoadedModel(model, tokenizer=None, template=None, path=Path("qwen2.5-7b-shapes-random"))

    steps = a.warmup + a.steps
    if a.case == "packed":  # ~180-token samples filling --rows rows of --seq per GPU and step
        lengths = [random.Random(1).randint(60, 300) for _ in range(997)]
        per_gpu = round(a.rows * a.seq / (sum(lengths) / len(lengths)) * 0.95)  # ~5% room for first-fit packing
    else:
        lengths, per_gpu = [a.seq], a.rows
    samples = random_samples(per_gpu * world * steps, lengths, cfg.vocab_size)
    out_dir = tempfile.mkdtemp(prefix="tunesmith-ddp-bench-")
    args = resolve_defaults(SftArgs(
        model=str(lm.path), dataset=["random"], train_type=a.train_type, torch_dtype="bfloat16", device="cuda",
        per_device_train_batch_size=1, gradient_accumulation_steps=per_gpu, max_length=a.seq, max_steps=steps,
        learning_rate=1e-4, lora_dropout=0.0, gradient_checkpointing=a.checkpointing, logging_steps=1,
        save_steps=10**9, output_dir=out_dir, add_version=False))
    trainer = Trainer(args, lm, samples, [], Path(out_dir), device, quiet=True)
    dp = trainer.dp

    torch.cuda.reset_peak_memory_stats()
    times, out = [], {}
    for i in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = trainer.train_step()
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = dp.max(torch.cuda.max_memory_allocated(device) / 2**30)
    rec = {"gpus": dp.world, "engine": dp.engine, "train_type": a.train_type, "case": a.case, "rows_per_gpu": a.rows,
           "seq": a.seq, "checkpointing": trainer.checkpointing, "tokens_per_step": out["tokens"],
           "tokens_per_s_per_gpu": round(out["tokens"] / sec / dp.world), "step_s": round(sec, 3),
           "peak_gib_per_gpu": round(peak, 2), "loss": round(out["loss"], 4), "init_s": round(init_s, 1),
           "layers": a.layers, "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    if dp.is_main:
        emit(rec)
    distributed.teardown()


def run_child(cmd: list[str]) -> list[dict]:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    for r in recs:
        emit(r)
    if p.returncode != 0:
        emit({"error": f"exit status {p.returncode}", "command": " ".join(cmd)})
    return recs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel run")
    ap.add_argument("--train_type", choices=("lora", "full"), default="lora", help="lora: DDP; full: FSDP2")
    ap.add_argument("--case", choices=("2048", "packed"), default="2048",
                    help="2048-token samples, or packed 60-300-token ones")
    ap.add_argument("--rows", type=int, default=4, help="rows of --seq tokens per GPU and optimizer step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per row (--max_length)")
    ap.add_argument("--layers", type=int, default=28, help="decoder layers (28 = the real 7B)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured first steps (compilation)")
    ap.add_argument("--checkpointing", type=lambda s: s.lower() == "true", default=False, metavar="true|false",
                    help="activation checkpointing (default false: the unconstrained speed)")
    ap.add_argument("--skip_single", action="store_true", help="only the N-GPU run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    passthrough = [f for f in sys.argv[1:] if f != "--skip_single"] + ["--worker"]
    one = [] if a.skip_single else run_child([sys.executable, __file__, *passthrough])
    many = run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                      str(a.gpus), __file__, *passthrough])
    if one and many and "tokens_per_s_per_gpu" in one[-1] and "tokens_per_s_per_gpu" in many[-1]:
        emit({"train_type": a.train_type, "case": a.case, "gpus": a.gpus,
              "scaling_efficiency": round(many[-1]["tokens_per_s_per_gpu"] / one[-1]["tokens_per_s_per_gpu"], 3),
              "total_speedup": round(many[-1]["tokens_per_s_per_gpu"] * a.gpus / one[-1]["tokens_per_s_per_gpu"], 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
