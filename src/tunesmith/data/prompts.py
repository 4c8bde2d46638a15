"""A prompts file, for `infer --prompts` and `eval --identity_questions`: the rows of a data file that sources.py
reads (JSON, JSONL, CSV, Parquet), or plain text with one prompt a line."""

from __future__ import annotations

from pathlib import Path

from tunesmith.data.sources import FILE_TYPES, read_rows, read_text
from tunesmith.errors import UserError


def read_prompts(path: Path) -> list[dict]:
    """A prompts file: JSON list / JSONL of strings or {"prompt"|"query"|"instruction", "reference"?} rows, a CSV
    with those columns, or text lines."""
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file.")
    if path.suffix.lower() in FILE_TYPES:
        rows = read_rows(path)
    else:  # split("\n"), not splitlines(): a prompt may hold a raw U+2028, which splitlines() breaks on
        rows = [(f"{path} line {i}", line) for i, line in enumerate(read_text(path).split("\n"), 1) if line.strip()]
    out = []
    for where, r in rows:
        if isinstance(r, str):
            out.append({"messages": [{"role": "user", "content": r}], "reference": None})
            continue
        q = (r.get("prompt") or r.get("query") or r.get("instruction")) if isinstance(r, dict) else None
        if not isinstance(q, str):
            raise UserError(f"{where} has no 'prompt' (or 'query'/'instruction') text.")
        out.append({"messages": [{"role": "user", "content": q}], "reference": r.get("reference") or r.get("response")})
    return out
