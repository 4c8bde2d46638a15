"""`tunesmith export`: merge a LoRA into its base and write an HF folder (+ GGUF and an Ollama Modelfile), convert a
plain model, or check that vLLM can serve an adapter.

  export --adapters CKPT --merge_lora true [--to_gguf true]   -> <CKPT>-merged/ (as ms-swift names it)
  export --adapters CKPT                                      -> the vLLM check only
  export --model X.gguf [--to_gguf true]                      -> <X>-hf/ (the HF folder vLLM needs)
  export --model DIR --to_gguf true                           -> DIR/model-<type>.gguf + DIR/Modelfile

How the merge is done and the output folder guarded: export/merge.py.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

from tunesmith.args import ExportArgs
from tunesmith.errors import UserError
from tunesmith.export.hf import DTYPE_NAMES
from tunesmith.export.merge import (MARKER, adapter_sha256, base_model_of, claimed_output, merged_history, output_dtype,
                                    write_export)
from tunesmith.export.vllm_check import vllm_report
from tunesmith.model.load import load_model, pick_device, resolve_model_path
from tunesmith.model.quant import dequantize_linears, is_quantized
from tunesmith.session import load_for_generation, override_template, parse_adapter_specs


def export(args: ExportArgs) -> int:
    if args.quant_bits or args.quant_method == "bnb":
        raise UserError(f"export writes full-precision weights and does not quantize (--quant_bits {args.quant_bits}); "
                        f"leave --quant_method/--quant_bits out: a LoRA trained on a quantized base merges into the "
                        f"unquantized one.")
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
        base = base_model_of(args, ckpt)
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
        with claimed_output(out, marker):
            dtype = output_dtype(args, base_path)
            # unquantized: an adapter trained on a 4/8-bit base (args.json's --quant_bits) merges into the
            # full-precision base, as QLoRA merges are done
            session = load_for_generation(dataclasses.replace(args, model=base, merge_lora=True,
                                                              torch_dtype=DTYPE_NAMES[dtype]), unquantized=True)
            write_export(session.lm, out, args, session.system, marker)
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
    with claimed_output(out, marker) if is_gguf else nullcontext():
        lm = load_model(path, output_dtype(args, path), device)
        if is_quantized(lm.model):  # a folder stored by bitsandbytes: written dequantized
            dequantize_linears(lm.model, output_dtype(args, path))
        if args.template:
            override_template(lm, args.template)
        write_export(lm, out, args, args.system, marker, hf=is_gguf)
    return 0
