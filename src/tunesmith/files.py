"""JSON files on disk: reading one a user gave (a bad file is one sentence naming it, its line and column) and
writing one atomically (into a temporary file renamed into place, so a reader never sees half of it)."""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import UserError


def read_json(path: Path):
    """json.load with one clear sentence on failure (file, line and column)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix the file.")
    except RecursionError:
        raise UserError(f"{path}: its JSON is nested too deeply to read; fix the file.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (a damaged or truncated file?); fix or replace the file.") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}).")


def write_json(path: Path, obj) -> None:
    """Atomically (temporary file, fsync, rename); a failed write is WriteError and the old file stays."""
    text = json.dumps(obj, ensure_ascii=False, indent=2, default=str)
    write_bytes_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class WriteError(UserError):
    """A file could not be written (a full disk, an I/O error, no permission): one sentence naming the file, the
    reason and the free space left there; `hint` says how to go on."""

    def __init__(self, path: Path, reason: str, hint: str | None = None):
        self.path, self.reason = Path(path), reason
        hint = hint or "free some space (or pick another --output_dir), then run again"
        super().__init__(f"cannot write {path} ({reason}; {free_space(path)} free on that disk); {hint}.")

    def again(self, path: Path | None = None, hint: str | None = None) -> "WriteError":
        """The same failure told for another path (a temporary file's final name) or with another hint."""
        return WriteError(self.path if path is None else path, self.reason, hint)


def free_space(path: Path) -> str:
    """shutil.disk_usage of the nearest existing folder above `path`, as '12.3 MiB'; 'unknown' if unreadable."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = float(shutil.disk_usage(p).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"


def io_reason(e: BaseException) -> str | None:
    """What went wrong, when `e` is a failed write (an OSError, or the storage errors of safetensors and torch's
    zip writer, which carry no errno); None when it is not an I/O error."""
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    inner = e.__cause__ or e.__context__  # torch's zip writer over a Python file: the file's OSError
    if isinstance(inner, OSError):
        return io_reason(inner)
    text = str(e)
    m = re.search(r"os error (\d+)", text)
    if m:
        return os.strerror(int(m.group(1)))
    if type(e).__name__ == "SafetensorError" and ("I/O" in text or "Io" in text):
        return text.splitlines()[0][:200]
    if isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text
                                        or "file write failed" in text):
        return "the write failed"
    return None


@contextmanager
def writing(path: Path, hint: str | None = None):
    """Turn a failed write inside the block into WriteError naming `path` (or the file the OSError names)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001  (only I/O failures are converted; anything else is re-raised)
        reason = io_reason(e)
        if reason is None:
            raise
        named = getattr(e, "filename", None)
        raise WriteError(Path(named) if named else path, reason, hint) from None


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, write) -> None:
    """`write(tmp_path)` writes the file's bytes to a temporary file beside `path`, which then replaces it: a
    reader never sees half a file, and a failed write (WriteError) leaves the previous file as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path):
            write(tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
    except WriteError as e:
        tmp.unlink(missing_ok=True)
        raise (e.again(path) if e.path == tmp else e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
