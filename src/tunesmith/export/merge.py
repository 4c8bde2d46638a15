"""What `tunesmith export` writes: a LoRA merged into its base, or a plain model converted, as an HF folder (+ GGUF and
an Ollama Modelfile), into an output folder that only the same export may reuse.

The merge runs in fp32 and is cast back to the base's dtype (lora.merge_lora); the folder is written in the base's
dtype (HF bases: their config's torch_dtype; GGUF bases: float32, the exact values the adapter was trained on;
--torch_dtype overrides). The checkpoint's training system prompt becomes the written template's default.

Never a double-applied delta: every merged folder carries tunesmith_merged.json (and a merged GGUF the key
`tunesmith.merged_adapters`) listing the sha256 of each adapter file in its weights. Merging an adapter into a
base that lists it is refused; re-running the same export into its own output folder rewrites the same bytes;
an output folder holding anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from tunesmith.args import ExportArgs
from tunesmith.errors import UserError
from tunesmith.export.gguf import MERGED_KEY, write_gguf, write_modelfile
from tunesmith.export.hf import DTYPE_NAMES, save_hf_folder
from tunesmith.model.gguf_file import GGUFFile
from tunesmith.files import read_json
from tunesmith.model.load import DTYPES, LoadedModel, parse_dtype
from tunesmith.model.lora import read_adapter_config
from tunesmith.runs import read_checkpoint_args

MARKER = "tunesmith_merged.json"


def adapter_sha256(ckpt: Path) -> str:
    f = Path(ckpt) / "adapter_model.safetensors"
    if not f.is_file():
        raise UserError(f"{ckpt}: no adapter_model.safetensors; --adapters needs a LoRA checkpoint folder.")
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def merged_history(model_path: Path) -> list[dict]:
    """[{adapter, sha256}, ...] of the adapters already merged into these weights (empty for a pristine model)."""
    if model_path.is_dir():
        marker = model_path / MARKER
        return read_json(marker).get("merged_adapters", []) if marker.is_file() else []
    if model_path.suffix.lower() == ".gguf":
        return [{"adapter": None, "sha256": s} for s in GGUFFile(model_path).metadata.get(MERGED_KEY, [])]
    return []


def base_model_of(args: ExportArgs, ckpt: Path) -> str:
    """The base model, found the way session.load_for_generation finds it (--model, args.json, adapter_config)."""
    base = (args.model or read_checkpoint_args(ckpt).get("model")
            or read_adapter_config(ckpt).get("base_model_name_or_path"))
    if not base:
        raise UserError(f"{ckpt}: the checkpoint does not name its base model; pass --model.")
    return base


def output_dtype(args: ExportArgs, model_path: Path) -> torch.dtype:
    if args.torch_dtype:
        return parse_dtype(args.torch_dtype)
    if model_path.is_dir() and (model_path / "config.json").is_file():
        raw = read_json(model_path / "config.json")
        return DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype"))) or torch.float32
    return torch.float32  # GGUF: dequantized values are exact in fp32, not in bf16/fp16


@contextmanager
def claimed_output(out: Path, marker: dict):
    """_claim_output for the duration of an export; a folder it created is removed again if the export fails."""
    created = not out.exists()
    _claim_output(out, marker)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _claim_output(out: Path, marker: dict) -> None:
    """Refuse an output folder that holds anything but this very export; then mark it (before any weights, so an
    interrupted export is finished by running it again)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()):
        old = read_json(out / MARKER) if (out / MARKER).is_file() else None
        if old is None:
            raise UserError(f"{out} already exists and is not a tunesmith export; pick another --output_dir or "
                            f"remove the folder.")
        shas = lambda m: [a["sha256"] for a in m.get("merged_adapters", [])]  # noqa: E731
        same = old.get("base_model") == marker["base_model"] and shas(old) == shas(marker)
        if not same:
            raise UserError(f"{out} holds an export of another adapter or base ({MARKER}); pick another --output_dir "
                            f"or remove the folder.")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps(dict(marker, complete=False), indent=2))


def write_export(lm: LoadedModel, out: Path, args: ExportArgs, system: str | None, marker: dict, hf: bool = True) -> None:
    """The HF folder (into an output already claimed by _claim_output) and/or the GGUF + Modelfile."""
    if hf:
        save_hf_folder(lm, out, system=system, max_shard_size=args.max_shard_size)
        (out / MARKER).write_text(json.dumps(dict(marker, complete=True), indent=2))
        print(f"HF model folder: {out}  ({DTYPE_NAMES.get(next(lm.model.parameters()).dtype)})")
        print(f"  try it:  tunesmith infer --model {out}")
        print(f"  serve:   vllm serve {out}")
    if args.to_gguf:
        out.mkdir(parents=True, exist_ok=True)
        path = write_gguf(lm, out / f"model-{args.gguf_type}.gguf", args.gguf_type, system, name=out.name,
                          merged_adapters=[a["sha256"] for a in marker["merged_adapters"]])
        modelfile = write_modelfile(out, path, lm, system)
        print(f"GGUF ({args.gguf_type}): {path}")
        print(f"  Ollama:  ollama create {out.name.lower()} -f {modelfile}   (llama.cpp: llama-cli -m {path})")
