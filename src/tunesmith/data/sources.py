"""Where conversations come from: what `--dataset` names, loaded, sampled (`#N`), mixed and split.

A dataset spec is one of
  path/to/file.json | .jsonl | .csv | .parquet   rows in any format of formats.py
  path/to/folder                                 every such file in it, recursively, in sorted order
  self-cognition (or swift/self-cognition)       the built-in identity set, see self_cognition.py
  org/name                                       a hub dataset: only where the modelscope or datasets package is
                                                 installed and no *_OFFLINE variable is set
optionally followed by `#N` (ms-swift semantics): N below the dataset's size takes N distinct rows; N above it
takes every row N // size times plus N % size distinct rows. Sampling is seeded per source (seed and spec),
so two sources of equal size, such as the zh and en translations of one set, do not get the same row indices.

--model_name / --model_author fill {{NAME}} / {{AUTHOR}} in every source, not only the built-in one, so a local
copy of ms-swift's self-cognition file works too; an answer left with a placeholder is refused.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import random
import re
from pathlib import Path

from tunesmith.data.formats import to_messages
from tunesmith.data.self_cognition import check_no_placeholders, fill_placeholders, self_cognition_rows
from tunesmith.errors import UserError

BUILTIN_SELF_COGNITION = ("self-cognition", "swift/self-cognition")
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
# Metadata that hub downloads and `datasets.save_to_disk` put beside the data; they are not rows.
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "state.json"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE")
TRUE_VALUES = ("1", "true", "yes", "on")


def load_dataset(spec: str, seed: int, name: tuple[str, str] | None = None,
                 author: tuple[str, str] | None = None, answer: bool = True) -> list[list[dict]]:
    """One dataset spec → its conversations, `#N`-sampled when asked. answer=False: rows may end with the user's
    question (batch inference)."""
    source, count = _split_count(spec)
    if not source.strip():
        raise UserError(f"dataset {spec!r} names no file (an empty name, as an unset shell variable leaves); "
                        "pass a file, a folder or self-cognition.")
    convs = _load_source(source, name, author, answer)
    if not convs:
        raise UserError(f"dataset '{source}' has no rows; add rows to it or leave it out of --dataset.")
    if count is None:
        return convs
    check_count(spec, convs, count)
    return sample_rows(convs, count, random.Random(f"{seed}#{source}"))


def check_count(spec: str, convs: list[list[dict]], count: int) -> None:
    """`#N` beyond what memory can hold is refused before any row is copied: each sampled row costs its
    conversation's copy and, once tokenized, its token lists (about ROW_BYTES + TEXT_BYTES per character)."""
    chars = sum(len(m["content"]) for conv in convs for m in conv) / len(convs)
    limit = int(available_memory() // (ROW_BYTES + TEXT_BYTES * chars))
    if count > limit:
        raise UserError(f"dataset '{spec}' asks for {count:,} rows, but at most {limit:,} rows of it fit in the "
                        f"{available_memory() / 2**30:.1f} GiB of memory free here; ask for fewer after '#'.")


# Memory of one sampled row: its copied messages (~1 KiB), and per character of text the token ids, labels and
# offsets made when it is tokenized (~4 characters a token, ~100 bytes a token in Python lists).
ROW_BYTES, TEXT_BYTES = 1024, 25


def available_memory() -> int:
    """Bytes of memory free for new allocations (MemAvailable on Linux; physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**34


def load_datasets(specs: list[str], seed: int, name: tuple[str, str] | None = None,
                  author: tuple[str, str] | None = None, counts: dict[str, int] | None = None) -> list[list[dict]]:
    """Several dataset specs → one shuffled mix (seeded); `counts` (when given) gets each spec's conversations."""
    if not specs:
        raise UserError("no dataset was given; pass --dataset with a file, a folder or self-cognition.")
    convs = []
    for spec in specs:
        part = load_dataset(spec, seed, name, author)
        if counts is not None:
            counts[spec] = counts.get(spec, 0) + len(part)
        convs += part
    random.Random(seed).shuffle(convs)
    return convs


def split_dataset(convs: list[list[dict]], ratio: float, seed: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """Hold out ceil(ratio * len) conversations for evaluation (as `datasets.train_test_split` rounds)."""
    if not 0 <= ratio < 1:
        raise UserError(f"--split_dataset_ratio must be at least 0 and below 1, but is {ratio}.")
    n_val = math.ceil(len(convs) * ratio)
    if n_val == 0:
        return list(convs), []
    if n_val >= len(convs):
        raise UserError(f"--split_dataset_ratio {ratio} leaves none of the {len(convs)} conversations for "
                        "training; lower it, or pass --val_dataset instead.")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    val = [convs[i] for i in order[:n_val]]
    train = [convs[i] for i in sorted(order[n_val:])]
    return train, val


def sample_indices(size: int, count: int, rng: random.Random) -> list[int]:
    """ms-swift's `#N`: whole copies of the set, then a remainder drawn without replacement."""
    copies, remainder = divmod(count, size)
    return list(range(size)) * copies + rng.sample(range(size), remainder)


def sample_rows(convs: list[list[dict]], count: int, rng: random.Random) -> list[list[dict]]:
    """`#N` over conversations (copies, so filling one never changes another)."""
    return [[dict(message) for message in convs[i]] for i in sample_indices(len(convs), count, rng)]


def _split_count(spec: str) -> tuple[str, int | None]:
    """'data.json#500' → ('data.json', 500); a path that really contains '#' is left whole."""
    source, sep, count = spec.rpartition("#")
    if not sep or not count.isdigit() or Path(spec).expanduser().exists():
        return spec, None
    if int(count) == 0:
        raise UserError(f"dataset '{spec}' asks for 0 rows; give a positive count after '#', or leave the '#' out.")
    return source, int(count)


def _load_source(source: str, name, author, answer: bool = True) -> list[list[dict]]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise UserError(f"dataset folder '{source}' holds no .json, .jsonl, .csv or .parquet file; "
                            "put the data files in it or pass a file.")
        return [conv for file in files for conv in _conversations(read_rows(file), str(file), name, author, answer)]
    if path.is_file():
        return _conversations(read_rows(path), str(path), name, author, answer)
    if source in BUILTIN_SELF_COGNITION:
        rows = self_cognition_rows(name, author)
        where = "the built-in self-cognition data"
        return _conversations([(f"{where} row {i}", row) for i, row in enumerate(rows, 1)], where, None, None)
    if path.suffix.lower() in FILE_TYPES or not HUB_ID.fullmatch(source):
        raise UserError(f"dataset '{source}' does not exist (looked in {Path.cwd()}); check the path.")
    return _conversations(_hub_rows(source), source, name, author, answer)


def _conversations(rows: list[tuple[str, dict]], where: str, name, author, answer: bool = True) -> list[list[dict]]:
    """(where, row) pairs → conversations, placeholders filled, then refused if any answer still has one."""
    convs = []
    for row_where, row in rows:
        if (name is not None or author is not None) and isinstance(row, dict):
            row = fill_placeholders(row, name, author)
        convs.append(to_messages(row, row_where, answer))
    check_no_placeholders(convs, where)
    return convs


def _data_files(folder: Path) -> list[Path]:
    files = []
    for path in folder.rglob("*"):
        inner = path.relative_to(folder).parts
        if (path.is_file() and path.suffix.lower() in FILE_TYPES and path.name not in METADATA_FILES
                and not any(part.startswith(".") for part in inner)):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """A data file → (where, row) pairs; `where` names the file and the 1-based row (or line, for JSONL)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _numbered(path, _parquet_rows(path))
    text = read_text(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path, text)
    if suffix == ".csv":
        return _numbered(path, _csv_rows(path, text))
    return _json_rows(path, text)


def _numbered(path: Path, rows: list) -> list[tuple[str, dict]]:
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, 1)]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: files saved by Excel/Notepad start with a BOM
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it with UTF-8 encoding.") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check its permissions.") from None


def _json_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{path} holds JSON nested too deeply to read; a .json file holds one list of rows "
                        "(flat objects, or lists of turns).") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: read it as the JSON Lines it is
            return _jsonl_rows(path, text)
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        "fix it there (a .json file holds one list of rows).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {'object' if isinstance(data, dict) else 'value'}, not a list of rows; "
                        'write it as [{"instruction": ..., "output": ...}, ...] or {"data": [...]}.')
    return _numbered(path, data)


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() breaks on.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {lineno}", json.loads(line)))
        except RecursionError:
            raise UserError(f"{path} line {lineno} holds JSON nested too deeply to read; write that row as one "
                            "flat object.") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                            "fix that line (a .jsonl file holds one JSON object per line).") from None
    return rows


def _csv_rows(path: Path, text: str) -> list[dict]:
    csv.field_size_limit(2**31 - 1)  # long answers exceed the default 128 KiB cell limit
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for i, row in enumerate(reader, 1):
            extra = row.pop(None, None)  # cells beyond the header: a comma inside an unquoted cell, most often
            if extra:
                raise UserError(f"{path} row {i} (line {reader.line_num}) has {len(reader.fieldnames) + len(extra)} "
                                f"cells but the header names {len(reader.fieldnames)} columns; put quotes around a "
                                f"cell that holds a comma, or add the column to the header.")
            rows.append(row)
        return rows
    except csv.Error as e:
        raise UserError(f"{path} is not valid CSV ({e}); fix the quoting there.") from None


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e}); export it again.") from None


def _hub_rows(dataset_id: str) -> list[tuple[str, dict]]:
    package = _hub_package()
    if package is None:
        raise UserError(f"dataset '{dataset_id}' is not a local file or folder, and no dataset hub is reachable "
                        "here; download it and pass the local path (JSON, JSONL, CSV or Parquet).")
    try:
        if package == "modelscope":
            from modelscope import MsDataset

            rows = [dict(row) for row in MsDataset.load(dataset_id, split="train")]
        else:
            import datasets

            rows = [dict(row) for row in datasets.load_dataset(dataset_id, split="train")]
    except Exception as e:  # network, auth, unknown id: all mean the same thing to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"dataset '{dataset_id}' is not a local file or folder, and loading it with {package} "
                        f"failed ({reason}); download it and pass the local path (JSON, JSONL, CSV or Parquet).") from e
    return [(f"{dataset_id} row {i}", row) for i, row in enumerate(rows, 1)]


def _hub_package() -> str | None:
    """The hub client to use: modelscope first (the tutorial's ids are ModelScope's), then datasets."""
    if any(os.environ.get(v, "").strip().lower() in TRUE_VALUES for v in OFFLINE_VARIABLES):
        return None
    for package in ("modelscope", "datasets"):
        if importlib.util.find_spec(package) is not None:
            return package
    return None
