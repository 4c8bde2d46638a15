"""JSON files on disk: reading one a user gave (a bad file is one sentence naming it, its line and column) and
writing one atomically (into a temporary file renamed into place, so a reader never sees half of it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunesmith.errors import UserError


def read_json(path: Path):
    """json.load with one clear sentence on failure (file, line and column)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix the file.")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}).")


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, default=str))
    os.replace(tmp, path)
