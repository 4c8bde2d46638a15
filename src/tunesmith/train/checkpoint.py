"""Where a checkpoint is written: atomic checkpoint writes into the run folder (runs.py), rotation, the trainer
state a resume reads back.

A checkpoint is written into `.checkpoint-<step>.tmp` and renamed into place, so a crash never leaves a half
checkpoint where a resume or `infer --adapters` would find it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tunesmith.errors import UserError

STATE_FILE = "trainer_state.pt"


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
