"""The Identity and data page: the built-in self-cognition rows filled with the name and author, uploaded files read
by the CLI's own readers (data/sources.py, data/formats.py) with every bad row and its one-sentence error, column
mapping for unknown field names, and the data check (data/check.py) of the planned run.

A file with bad rows or mapped columns is trained from a cleaned copy beside it, <name>.clean.jsonl (its good
rows, fields renamed as mapped), so the run and its command line read exactly what the page showed.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.data.formats import to_messages
from tunesmith.data.self_cognition import self_cognition_rows
from tunesmith.data.sources import read_rows
from tunesmith.errors import UserError

# What an unknown column may be mapped to: the fields formats.py reads.
TARGETS = ("instruction", "input", "output", "query", "response", "system", "history", "messages", "conversations")
PAGE_SIZE = 10
CELL_CHARS = 300


def identity_rows(name: tuple[str, str] | None, author: tuple[str, str] | None, page: int) -> dict:
    rows = self_cognition_rows(name, author)
    part = rows[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
    return {"total": len(rows), "page": page, "pages": -(-len(rows) // PAGE_SIZE),
            "rows": [{"lang": r.get("tag"), "query": r["query"], "response": r["response"]} for r in part]}


def mapped(row, mapping: dict[str, str]):
    if not isinstance(row, dict) or not mapping:
        return row
    out = {}
    for k, v in row.items():
        target = mapping.get(k, k)
        if target == "":  # ignored column
            continue
        out[target] = v
    return out


def short(value):
    if isinstance(value, str):
        return value if len(value) <= CELL_CHARS else value[:CELL_CHARS] + "…"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + "…"


def inspect(path: Path, shown: str, mapping: dict[str, str] | None = None, page: int = 0) -> dict:
    """A data file as the page shows it: columns, a page of rows, every bad row with the CLI's sentence (naming
    the file as `shown`), and the dataset spec a run uses (the file, or its cleaned copy)."""
    mapping = {k: v for k, v in (mapping or {}).items() if v is not None}
    bad_targets = [v for v in mapping.values() if v not in TARGETS and v != ""]
    if bad_targets:
        raise UserError(f"column mapping target '{bad_targets[0]}' is not one of {', '.join(TARGETS)}; pick one of "
                        f"those, or leave the column ignored.")
    try:
        rows = read_rows(path)
    except UserError as e:
        return {"file": shown, "error": str(e).replace(str(path), shown), "rows": [], "bad": [], "columns": [],
                "total": 0, "good": 0, "page": 0, "pages": 0, "dataset": None}
    columns: list[str] = []
    for _, row in rows[:1000]:
        if isinstance(row, dict):
            columns += [k for k in row if k not in columns]
    good, bad, results = [], [], []
    for i, (where, row) in enumerate(rows, 1):
        m = mapped(row, mapping)
        try:
            to_messages(m, where.replace(str(path), shown))
            good.append(m)
            results.append(None)
        except UserError as e:
            bad.append({"row": i, "error": str(e)})
            results.append(str(e))
    part = range(page * PAGE_SIZE, min(len(rows), (page + 1) * PAGE_SIZE))
    preview = [{"row": i + 1, "cells": {k: short(v) for k, v in rows[i][1].items()} if isinstance(rows[i][1], dict)
                else {"": short(rows[i][1])}, "error": results[i]} for i in part]
    unknown = [c for c in columns if c not in TARGETS and c not in ("tag", "id")]
    dataset = None
    if good:
        if bad or any(mapping.values()) or any(v == "" for v in mapping.values()):
            clean = path.with_name(path.name.rsplit(".", 1)[0] + ".clean.jsonl")
            clean.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good), encoding="utf-8")
            dataset = str(Path(shown).with_name(clean.name).as_posix())
        else:
            dataset = shown
    return {"file": shown, "error": None, "columns": columns, "unknown_columns": unknown, "targets": list(TARGETS),
            "mapping": mapping, "total": len(rows), "good": len(good), "bad": bad, "rows": preview, "page": page,
            "pages": -(-len(rows) // PAGE_SIZE), "dataset": dataset,
            "needs_mapping": bool(bad) and not good and bool(unknown)}


def data_check(args) -> dict:
    """data/check.py's check of the planned run (as `sft --dry_run true` prints it): conversations per source,
    tokens, truncation, duplicates, supervised tokens, optimizer steps; general-distill rows counted, not made."""
    from tunesmith.train.setup import identity_terms, load_training_data
    from tunesmith.data.check import check_data, teaches_identity
    from tunesmith.data.self_cognition import general_distill_instructions
    from tunesmith.model.load import load_template
    from tunesmith.train.loop import resolve_defaults, schedule

    args = resolve_defaults(args)
    train, val, distill, sources = load_training_data(args)
    pending = 0
    for spec in distill:
        _, _, n = spec.partition("#")
        if n and not n.isdigit():
            raise UserError(f"--dataset {spec}: the part after '#' must be a number of rows, e.g. general-distill#200.")
        sources[spec] = int(n) if n else len(general_distill_instructions())
        pending += sources[spec]
    template = load_template(args.model)
    identity = teaches_identity(args.dataset, train, identity_terms(args))
    check, _ = check_data(template, args.system, args.max_length, args.truncation_strategy, sources, train, len(val),
                          lambda n: schedule(args, n), identity, pending)
    out = check.to_dict()
    out["lines"] = check.lines()
    return out
