"""The built-in self-cognition data (`--dataset self-cognition`) and the held-out sets that check it.

All of it lives in self_cognition.json beside this file:
  train                 120 rows {"query", "response", "tag": "zh"|"en"}, half Chinese, half English; answers
                        carry {{NAME}} / {{AUTHOR}} placeholders, filled from --model_name / --model_author
                        (Chinese rows take the first value, English rows the second), as in ms-swift.
  identity_eval         40 identity questions phrased unlike any training row, to see if the identity generalises;
                        "expects" says what a right answer mentions: "name", "author" or "any" (either).
  general_prompts       30 general questions; "answer" lists acceptable substrings (compare case-insensitively),
                        or is null when the answer cannot be checked by substring.
  distill_instructions  150 general instructions; the base model's own answers to them make "general" data that
                        keeps its abilities during identity training (self-distillation). None of them is a
                        general_prompts question.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from tunesmith.errors import UserError

PLACEHOLDERS = {"{{NAME}}": "--model_name", "{{AUTHOR}}": "--model_author"}
DATA_FILE = Path(__file__).with_name("self_cognition.json")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@cache
def _bundled() -> dict:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def self_cognition_rows(name: tuple[str, str] | None, author: tuple[str, str] | None) -> list[dict]:
    """The built-in rows (fresh copies) with placeholders filled per language; a None leaves its placeholder."""
    return [fill_placeholders(row, name, author) for row in _bundled()["train"]]


def fill_placeholders(row: dict, name: tuple[str, str] | None, author: tuple[str, str] | None) -> dict:
    """Fill {{NAME}} / {{AUTHOR}} in every text field of a row (any format, nested or not).

    The language picks the value: the row's "tag" ("zh" or "en", as in ms-swift's self-cognition set), otherwise
    Chinese when the row contains any CJK character.
    """
    tag = row.get("tag")
    zh = tag == "zh" if tag in ("zh", "en") else bool(CJK.search(json.dumps(row, ensure_ascii=False)))
    values = {"{{NAME}}": name, "{{AUTHOR}}": author}

    def fill(value):
        if isinstance(value, str):
            for placeholder, pair in values.items():
                if pair is not None:
                    value = value.replace(placeholder, pair[0] if zh else pair[1])
            return value
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    return fill(row)


def parse_name_author(values: list[str] | None) -> tuple[str, str] | None:
    """--model_name / --model_author: one value serves both languages; two are Chinese, then English."""
    if not values:
        return None
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    listed = ", ".join(repr(v) for v in values)
    raise UserError(f"--model_name and --model_author take one value, or two (Chinese first, then English), "
                    f"but got {len(values)}: {listed}; quote a name that contains spaces.")


def check_no_placeholders(convs: list[list[dict]], where: str) -> None:
    """Refuse to train answers that still say {{NAME}} or {{AUTHOR}} (conversation numbers start at 1)."""
    for i, conv in enumerate(convs, 1):
        for message in conv:
            if message["role"] != "assistant":
                continue
            for placeholder, flag in PLACEHOLDERS.items():
                if placeholder in message["content"]:
                    other = "--model_author" if flag == "--model_name" else "--model_name"
                    raise UserError(f"{where}, conversation {i}, contains the placeholder {placeholder} in an answer; "
                                    f"pass {flag} (and {other}) so the self-cognition data can be filled in.")


def identity_eval_questions() -> list[dict]:
    """40 held-out identity questions: {"question", "lang": "en"|"zh", "expects": "name"|"author"|"any"}."""
    return [dict(q) for q in _bundled()["identity_eval"]]


def general_prompts() -> list[dict]:
    """30 general questions: {"prompt", "answer": [substrings] | None, "lang": "en"|"zh"}."""
    return [dict(p) for p in _bundled()["general_prompts"]]


def general_distill_instructions() -> list[str]:
    """150 general instructions (English and Chinese) for self-distilling general data from the base model."""
    return list(_bundled()["distill_instructions"])
