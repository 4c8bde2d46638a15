"""Where a checkpoint is written: run folders laid out as ms-swift does, atomic checkpoint writes, rotation.

  <output_dir>/v<N>-<YYYYMMDD-HHMMSS>/
      args.json  logging.jsonl  runs/ (TensorBoard)  loss.png
      checkpoint-<step>/   LoRA: adapter_config.json + adapter_model.safetensors   full: an HF model folder
                           + args.json (base model, template, system) + trainer_state.pt (optimizer,
                           scheduler step, RNG, data position) for --resume_from_checkpoint

A checkpoint is written into `.checkpoint-<step>.tmp` and renamed into place, so a crash never leaves a half
checkpoint where a resume or `infer --adapters` would find it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.text.tokenizer import read_json

ARGS_FILE = "args.json"
STATE_FILE = "trainer_state.pt"


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


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, default=str))
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, write_files, keep: int | None, best: Path | None) -> Path:
    """`write_files(tmp_dir)` writes the checkpoint's files; then the folder is renamed into place atomically."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_files(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    rotate_checkpoints(run_dir, keep, best)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def rotate_checkpoints(run_dir: Path, keep: int | None, best: Path | None) -> None:
    """Keep the newest `keep` checkpoints, and always the best (lowest eval loss) and the last."""
    if not keep or keep <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    protected = {ckpts[-1]} | ({best} if best is not None else set())
    room = max(keep - len(protected), 0)
    others = [c for c in ckpts if c not in protected]
    for c in others[: max(len(others) - room, 0)]:
        shutil.rmtree(c, ignore_errors=True)


def read_checkpoint_args(ckpt: Path) -> dict:
    """The args.json a tunesmith (or ms-swift) checkpoint carries; {} when it has none."""
    for p in (Path(ckpt) / ARGS_FILE, Path(ckpt).parent / ARGS_FILE):
        if p.is_file():
            return read_json(p)
    return {}


def save_trainer_state(path: Path, state: dict) -> None:
    torch.save(state, path / STATE_FILE)


def check_resumable(ckpt: Path) -> None:
    """Before anything loads: --resume_from_checkpoint names a checkpoint tunesmith sft wrote."""
    if not Path(ckpt).is_dir():
        raise UserError(f"--resume_from_checkpoint {ckpt}: no such checkpoint folder.")
    if not (Path(ckpt) / STATE_FILE).is_file():
        raise UserError(f"{ckpt}: no {STATE_FILE}; --resume_from_checkpoint needs a checkpoint written by tunesmith sft.")


def load_trainer_state(ckpt: Path) -> dict:
    check_resumable(ckpt)
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
