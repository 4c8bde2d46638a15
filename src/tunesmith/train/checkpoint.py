"""Where a checkpoint is written: atomic checkpoint writes into the run folder (runs.py), rotation, the trainer
state a resume reads back.

A checkpoint is written into `.checkpoint-<step>.tmp`, fsynced, and renamed into place, and one is deleted by first
renaming it out of its name (`.deleting-checkpoint-<step>`), so a crash never leaves a half checkpoint where a
resume or `infer --adapters` would find it; clean_leftovers removes such folders at the next run or resume.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.files import WriteError, fsync_path, read_json, writing

STATE_FILE = "trainer_state.pt"


def save_checkpoint(run_dir: Path, step: int, write_files, keep: int | None, best: Path | None) -> Path:
    """`write_files(tmp_dir)` writes the checkpoint's files; they and the folder are fsynced, then the folder is
    renamed into place atomically. A failed write (a full disk, an I/O error) removes the temporary folder and is
    one sentence (WriteError) naming the file under its final name, the free space, and the checkpoint to resume
    from."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(tmp):
            tmp.mkdir()
            write_files(tmp)
            fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteError):
            failed = final / e.path.relative_to(tmp) if e.path.is_relative_to(tmp) else e.path
            raise e.again(failed, resume_hint(run_dir)) from None
        raise
    if final.exists():  # the same step saved again: the old one goes out of the name first (see discard)
        discard(final)
    os.replace(tmp, final)
    fsync_path(run_dir)
    rotate_checkpoints(run_dir, keep, best)
    return final


def resume_hint(run_dir: Path) -> str:
    """How to go on after a failed write: resume from the last complete checkpoint, or run again."""
    saved = list_checkpoints(run_dir)
    if saved:
        return (f"the checkpoints written are intact: free some space, then resume with --resume_from_checkpoint "
                f"{saved[-1]}")
    return "no checkpoint was written yet: free some space, then run again"


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder (its entries), deepest first."""
    folders = [folder]
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            folders.append(p)
        else:
            fsync_path(p)
    for d in reversed(folders):
        fsync_path(d)


DELETING = ".deleting-"


def discard(ckpt: Path) -> None:
    """Delete a checkpoint folder: first renamed out of its `checkpoint-N` name (into `.deleting-checkpoint-N`),
    then removed, so a kill midway never leaves a `checkpoint-N` with files missing; clean_leftovers removes what
    such a kill leaves."""
    doomed = ckpt.with_name(DELETING + ckpt.name)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(ckpt, doomed)
    fsync_path(ckpt.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what a killed run leaves in its folder: half-deleted (`.deleting-checkpoint-N`) and half-written
    (`.checkpoint-N.tmp`, `.checkpoint-N.optimizer.tmp`) checkpoints. Returns what was removed."""
    gone = []
    if not Path(run_dir).is_dir():
        return gone
    for p in sorted(Path(run_dir).iterdir()):
        if p.name.startswith((DELETING + "checkpoint-", ".checkpoint-")) and (p.name.startswith(DELETING)
                                                                              or p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


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
        discard(c)


def save_trainer_state(path: Path, state: dict) -> None:
    """Through a Python file object, so a full disk is an OSError with its errno (torch's own file writer says only
    'unexpected pos')."""
    with writing(path / STATE_FILE), open(path / STATE_FILE, "wb") as f:
        torch.save(state, f)


def check_resumable(ckpt: Path) -> None:
    """Before anything loads: --resume_from_checkpoint names a checkpoint tunesmith sft wrote."""
    if not Path(ckpt).is_dir():
        raise UserError(f"--resume_from_checkpoint {ckpt}: no such checkpoint folder.")
    if not (Path(ckpt) / STATE_FILE).is_file():
        raise UserError(f"{ckpt}: no {STATE_FILE}; --resume_from_checkpoint needs a checkpoint written by tunesmith sft.")


def load_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt; a damaged or truncated file is one sentence naming it."""
    check_resumable(ckpt)
    path = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (zip, pickle and EOF errors: all mean the file is damaged)
        raise damaged(path, e) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise damaged(path, ValueError("it holds no training step"))
    return state


def check_checkpoint_files(ckpt: Path) -> None:
    """Before anything loads or is written: the files a resume reads are whole (trainer_state.pt's zip entries
    pass their CRC check; a LoRA checkpoint's adapter_config.json and adapter_model.safetensors read back)."""
    import zipfile

    from tunesmith.model.lora import check_adapter_config, read_adapter_config, read_adapter_weights

    path = Path(ckpt) / STATE_FILE
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise damaged(path, e) from None
    if bad is not None:
        raise damaged(path, ValueError(f"its entry {bad} fails its CRC check"))
    if (Path(ckpt) / "adapter_config.json").is_file() or (Path(ckpt) / "adapter_model.safetensors").is_file():
        check_adapter_config(read_adapter_config(ckpt), ckpt)
        read_adapter_weights(ckpt)


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint was saved at: its `checkpoint-N` name, else what its trainer_state.pt says."""
    tail = Path(ckpt).resolve().name.rsplit("-", 1)[-1]
    return int(tail) if Path(ckpt).resolve().name.startswith("checkpoint-") and tail.isdigit() else \
        load_trainer_state(ckpt)["step"]


def damaged(path: Path, e: BaseException) -> UserError:
    """The one sentence for a checkpoint file that cannot be read back."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160].rstrip(".")
    return UserError(f"{path} is damaged or truncated ({reason}); resume from (or use) an earlier checkpoint, or "
                     f"copy this one again.")


# What a resume must not change: the checkpoint's weights and data order were made with these.
RESUME_FIXED = ("model", "train_type", "lora_rank", "lora_alpha", "target_modules", "dataset")


def check_same_run(ckpt: Path, given: dict) -> None:
    """--resume_from_checkpoint with flags that differ from the checkpoint's args.json in what a resume cannot
    change: one sentence naming each flag, the checkpoint's value and the given one."""
    from tunesmith.runs import ARGS_FILE

    path = Path(ckpt) / ARGS_FILE
    if not path.is_file():
        return
    saved = read_json(path)
    keys = [k for k in RESUME_FIXED if saved.get("train_type") != "full" or not k.startswith(("lora_", "target_"))]
    changed = [f"--{k} {_shown(given[k])} (the checkpoint's: {_shown(saved[k])})" for k in keys
               if k in saved and k in given and _norm(k, saved[k]) != _norm(k, given[k])]
    if changed:
        raise UserError(f"--resume_from_checkpoint {ckpt}: {', '.join(changed)} differ from the run it continues "
                        f"({path}); resume with the checkpoint's values, or start a new run without "
                        f"--resume_from_checkpoint.")


def _norm(key: str, value):
    if key == "model" and value:
        from tunesmith.model.load import resolve_model_path

        try:
            return str(resolve_model_path(str(value)).resolve())
        except UserError:
            return str(value)
    if key == "dataset" and isinstance(value, (list, tuple)):
        return [_norm_spec(str(v)) for v in value]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _norm_spec(spec: str) -> str:
    """A dataset spec with its path made absolute where it exists here ('data.json#10' keeps its '#10')."""
    source, sep, count = spec.rpartition("#")
    if not sep or not count.isdigit() or Path(spec).expanduser().exists():
        source, sep, count = spec, "", ""
    p = Path(source).expanduser()
    return (str(p.resolve()) if p.exists() else source) + sep + count


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
