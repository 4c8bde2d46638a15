"""What a run's flags resolve to before its Trainer is built (train/loop.py): the conversations it trains on, the
identity terms it teaches, the memory plan for its device, its seeds. Shared by `tunesmith sft` and the studio's
pre-flight estimate (studio/estimate.py), which must decide exactly as a run does."""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tunesmith.args import SftArgs
from tunesmith.errors import UserError
from tunesmith.model.load import LoadedModel, model_config
from tunesmith.model.quant import quant_modules
from tunesmith.train import distributed
from tunesmith.train.loop import PAD_MULTIPLE, planned_steps
from tunesmith.train.plan import Plan, device_budget_gib, plan_run

def check_retain_kl(args: SftArgs) -> None:
    if not args.retain_kl:
        return
    if args.train_type != "lora":
        raise UserError(f"--retain_kl {args.retain_kl} needs --train_type lora: the base it keeps close to is the same "
                        f"weights with the adapter switched off; drop --retain_kl for full fine-tuning.")
    if not any(d.split("#")[0] == "general-distill" for d in args.dataset):
        raise UserError(f"--retain_kl {args.retain_kl} applies to general-distill rows, and --dataset has none; add "
                        f"--dataset general-distill#N (N general answers of the base model), or drop --retain_kl.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_training_data(args: SftArgs, strict: bool = True):
    """(train convs, val convs, distill specs, conversations per source) — before the model loads, so bad data
    fails fast. strict: answers that still hold {{NAME}} / {{AUTHOR}} are refused (the dry run counts them)."""
    from tunesmith.data import self_cognition as sc
    from tunesmith.data.sources import load_datasets, split_dataset

    name, author = sc.parse_name_author(args.model_name or None), sc.parse_name_author(args.model_author or None)
    if not args.dataset:
        raise UserError("no --dataset given; pass a file or folder (JSON, JSONL, CSV, Parquet) or 'self-cognition'.")
    distill = [d for d in args.dataset if d.split("#")[0] == "general-distill"]
    plain = [d for d in args.dataset if d not in distill]
    sources: dict[str, int] = {}
    train = load_datasets(plain, args.data_seed, name, author, sources) if plain else []
    val = load_datasets(args.val_dataset, args.data_seed, name, author) if args.val_dataset else []
    if strict:
        sc.check_no_placeholders(train, "--dataset")
        sc.check_no_placeholders(val, "--val_dataset")
    if not val and args.split_dataset_ratio > 0:
        train, val = split_dataset(train, args.split_dataset_ratio, args.data_seed)
    return train, val, distill, sources


def identity_terms(args: SftArgs) -> list[str]:
    return sorted({t for t in list(args.model_name) + list(args.model_author) if t})


def process_start_time() -> float | None:
    """This process's start as a Unix time (Linux /proc, 10 ms resolution); None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])  # seconds since boot, now
        return time.time() - uptime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # stat field 22: start, ticks
    except (OSError, ValueError, IndexError):
        return None


def plan_base(args: SftArgs, convs: list, device, quiet: bool) -> SftArgs:
    """Before the model loads: whether its base must be 4-bit to fit this device (train/plan.py), from its shapes
    and a bound on the rows' tokens (a conversation's UTF-8 bytes and a few tokens per message bound its tokens
    under byte-level BPE). Returns args with --quant_bits 4 when so."""
    sizes = sorted((sum(len(str(m.get("content") or "").encode()) + 8 for m in c) + 16 for c in convs), reverse=True)
    group = args.per_device_train_batch_size * args.gradient_accumulation_steps
    row = min(args.max_length, sum(sizes[:group]) if args.packing else sizes[0])
    pre = plan_run(model_config(args.model), budget_gib=device_budget_gib(device), row_tokens=row,
                   planned_tokens=0, row_lengths=1, train_type=args.train_type, lora_rank=args.lora_rank,
                   checkpointing=args.gradient_checkpointing, compile=args.torch_compile or False)
    return replace(args, quant_method="bnb", quant_bits=4) if pre.quant_bits else args


def plan_training(args: SftArgs, lm: LoadedModel, train: list, device) -> Plan:
    """The memory plan (train/plan.py) for these samples on this device: rows as the trainer will pack them."""
    lengths = sorted((len(s.input_ids) for s in train), reverse=True)
    group = args.per_device_train_batch_size * args.gradient_accumulation_steps
    row = min(max(args.max_length, lengths[0]), sum(lengths[:group])) if args.packing else lengths[0]
    steps = planned_steps(args, len(train), torch.distributed.get_world_size() if distributed.active() else 1)
    tokens = steps * group * sum(lengths) / len(lengths)
    row_lengths = len({-(-min(n, row) // PAD_MULTIPLE) for n in lengths})
    quantized = quant_modules(lm.model)
    bits = next(m for _, m in quantized).bits if quantized else args.quant_bits
    return plan_run(lm.config, budget_gib=device_budget_gib(device), row_tokens=row, planned_tokens=tokens,
                    row_lengths=row_lengths, train_type=args.train_type, lora_rank=args.lora_rank, quant_bits=bits,
                    checkpointing=args.gradient_checkpointing, compile=args.torch_compile,
                    on_gpu=device.type == "cuda")
