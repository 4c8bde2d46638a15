"""`tunesmith export`: merge a LoRA into its base and write an HF folder (+ GGUF and an Ollama Modelfile), convert a
plain model, or check that vLLM can serve an adapter.

  export --adapters CKPT --merge_lora true [--to_gguf true]   -> <CKPT>-merged/ (as ms-swift names it)
  export --adapters CKPT                                      -> the vLLM check only
  export --model X.gguf [--to_gguf true]                      -> <X>-hf/ (the HF folder vLLM needs)
  export --model DIR --to_gguf true                           -> DIR/model-<type>.gguf + DIR/Modelfile

The merge runs in fp32 and is cast back to the base's dtype (lora.merge_lora); the folder is written in the base's
dtype (HF bases: their config's torch_dtype; GGUF bases: float32, the exact values the adapter was trained on;
--torch_dtype overrides). The checkpoint's training system prompt becomes the written template's default.

Never a double-applied delta: every merged folder carries tunesmith_merged.json (and a merged GGUF the key
`tunesmith.merged_adapters`) listing the sha256 of each adapter file in its weights. Merging an adapter into a
base that lists it is refused; re-running the same export into its own output folder rewrites the same bytes;
an output folder holding anything else is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from tunesmith.args import ExportArgs
from tunesmith.errors import UserError
from tunesmith.export.gguf import MERGED_KEY, write_gguf, write_modelfile
from tunesmith.export.hf import DTYPE_NAMES, save_hf_folder
from tunesmith.export.vllm_check import vllm_report
from tunesmith.model.gguf_file import GGUFFile
from tunesmith.model.load import DTYPES, LoadedModel, load_model, parse_dtype, pick_device, resolve_model_path
from tunesmith.model.lora import read_adapter_config
from tunesmith.text.tokenizer import read_json
from tunesmith.train.checkpoint import read_checkpoint_args

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


def _base_of(args: ExportArgs, ckpt: Path) -> str:
    """The base model, found the way infer.load_for_generation finds it (--model, args.json, adapter_config)."""
    base = (args.model or read_checkpoint_args(ckpt).get("model")
            or read_adapter_config(ckpt).get("base_model_name_or_path"))
    if not base:
        raise UserError(f"{ckpt}: the checkpoint does not name its base model; pass --model.")
    return base


def _out_dtype(args: ExportArgs, model_path: Path) -> torch.dtype:
    if args.torch_dtype:
        return parse_dtype(args.torch_dtype)
    if model_path.is_dir() and (model_path / "config.json").is_file():
        raw = read_json(model_path / "config.json")
        return DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype"))) or torch.float32
    return torch.float32  # GGUF: dequantized values are exact in fp32, not in bf16/fp16


@contextmanager
def _claimed(out: Path, marker: dict):
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


def _write(lm: LoadedModel, out: Path, args: ExportArgs, system: str | None, marker: dict, hf: bool = True) -> None:
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


def export(args: ExportArgs) -> int:
    from tunesmith.infer import load_for_generation, override_template, parse_adapter_specs

    adapters = parse_adapter_specs(args.adapters)
    if args.merge_lora and not adapters:
        raise UserError("--merge_lora true needs --adapters CKPT, the LoRA checkpoint to merge.")
    if adapters and not (args.merge_lora or args.to_gguf):
        for path in adapters.values():
            print(vllm_report(path))
        return 0

    if adapters:
        if len(adapters) > 1:
            raise UserError("export merges one adapter at a time; give one --adapters checkpoint.")
        ckpt = next(iter(adapters.values()))
        base = _base_of(args, ckpt)
        base_path = resolve_model_path(base)
        sha = adapter_sha256(ckpt)
        history = merged_history(base_path)
        if any(a["sha256"] == sha for a in history):
            raise UserError(f"{base_path} already has the adapter {ckpt} merged into it ({MARKER}); merging it "
                            f"again would add its change twice. Use {base_path} as it is, or pass the original base "
                            f"with --model.")
        out = Path(args.output_dir) if args.output_dir else Path(str(ckpt).rstrip("/") + "-merged")
        marker = {"base_model": str(base_path.resolve()),
                  "merged_adapters": history + [{"adapter": str(ckpt.resolve()), "sha256": sha}]}
        if not args.merge_lora:
            print("--to_gguf with --adapters: merging the adapter (a GGUF holds merged weights).")
        with _claimed(out, marker):
            dtype = _out_dtype(args, base_path)
            session = load_for_generation(dataclasses.replace(args, model=base, merge_lora=True,
                                                              torch_dtype=DTYPE_NAMES[dtype]))
            _write(session.lm, out, args, session.system, marker)
        return 0

    if not args.model:
        raise UserError("export needs --adapters CKPT (a LoRA checkpoint) or --model (a model to convert).")
    path = resolve_model_path(args.model)
    is_gguf = path.suffix.lower() == ".gguf"
    if not is_gguf and not args.to_gguf:
        raise UserError(f"{path} is already an HF model folder: add --to_gguf true to write a GGUF, or merge a LoRA "
                        f"with --adapters CKPT --merge_lora true.")
    out = Path(args.output_dir) if args.output_dir else (path.with_name(path.stem + "-hf") if is_gguf else path)
    marker = {"base_model": str(path.resolve()), "merged_adapters": merged_history(path)}
    device = pick_device(args.device)
    with _claimed(out, marker) if is_gguf else nullcontext():
        lm = load_model(path, _out_dtype(args, path), device)
        if args.template:
            override_template(lm, args.template)
        _write(lm, out, args, args.system, marker, hf=is_gguf)
    return 0
