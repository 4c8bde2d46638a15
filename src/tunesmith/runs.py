"""The run folder that `tunesmith sft` writes and infer, eval, export and deploy read, laid out as ms-swift's:

  <output_dir>/v<N>-<YYYYMMDD-HHMMSS>/
      args.json  logging.jsonl  runs/ (TensorBoard)  loss.png
      checkpoint-<step>/   LoRA: adapter_config.json + adapter_model.safetensors   full: an HF model folder
                           + args.json (base model, template, system) + trainer_state.pt (optimizer,
                           scheduler step, RNG, data position) for --resume_from_checkpoint

How a checkpoint is written (atomically, with rotation) is train/checkpoint.py's.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from tunesmith.files import read_json

ARGS_FILE = "args.json"


def new_run_dir(output_dir: str | Path, add_version: bool = True) -> Path:
    out = Path(output_dir)
    if not add_version:
        out.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    versions = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"v(\d+)-", p.name))]
    run = out / f"v{max(versions, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir()
    return run


# What a run writes before its first step (train/loop.py's Trainer and commands/sft.py): a folder holding no more
# has no result in it.
SETUP_FILES = {ARGS_FILE, "runs", "logging.jsonl", "logging.jsonl.tmp", "args.json.tmp"}


def discard_unused_run_dir(run: Path) -> bool:
    """Remove a run folder that failed before training (it holds nothing but setup files); True when removed."""
    run = Path(run)
    if not run.is_dir() or any(p.name not in SETUP_FILES for p in run.iterdir()):
        return False
    shutil.rmtree(run, ignore_errors=True)
    return True


def read_checkpoint_args(ckpt: Path) -> dict:
    """The args.json a tunesmith (or ms-swift) checkpoint carries; {} when it has none."""
    for p in (Path(ckpt) / ARGS_FILE, Path(ckpt).parent / ARGS_FILE):
        if p.is_file():
            return read_json(p)
    return {}
