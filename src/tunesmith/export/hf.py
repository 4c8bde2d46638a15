"""Write a complete HF model folder from a loaded model: what `transformers`, vLLM and `tunesmith --model` load.

  config.json                      ModelConfig.to_hf() + torch_dtype (+ bos/eos ids, as HF configs carry)
  model.safetensors                or model-0000i-of-0000N.safetensors + model.safetensors.index.json
  tokenizer.json, tokenizer_config.json   with the chat template (training system prompt as its default)
  generation_config.json           eos_token_id list, bos/pad ids, the model's sampling defaults

Weights are written one shard at a time: a shard's tensors are cast and copied to the CPU, saved, and freed,
so RAM never holds a second copy of the model (a 7B bf16 model with 5 GB shards peaks at one shard extra).
Tied embeddings are saved once, as `model.embed_tokens.weight` (no lm_head), as HF does.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.model.load import LoadedModel
from tunesmith.model.lora import lora_modules
from tunesmith.text.template import ChatTemplate

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000 (GB = 10^9, GiB = 2^30, as transformers' max_shard_size); ints are bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m:
        raise UserError(f"--max_shard_size '{size}' is not a size; write e.g. 5GB, 500MB or 2GiB.")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def template_with_default_system(template: ChatTemplate, system: str | None) -> str:
    """The chat template whose default system prompt is `system`: a prefix that prepends a system message when
    the conversation does not start with one, so every renderer (transformers, vLLM, llama.cpp --jinja) answers
    as tunesmith trained. Top-level `{% set %}` inside `{% if %}` rebinds `messages` for the whole template (jinja
    `if` opens no scope); checked on SmolLM2's and Qwen2.5's templates in tests/test_export.py.

    The string goes in as a JSON literal: jinja's lexer decodes the same escapes (\\n, \\", \\\\, \\uXXXX), and a
    `%}` inside a quoted literal does not end the tag."""
    source = template.source
    if system is None or template.default_system == system:
        return source
    prefix = ("{%- if messages and messages[0]['role'] != 'system' %}"
              "{%- set messages = [{'role': 'system', 'content': " + json.dumps(system, ensure_ascii=False) + "}]"
              " + messages %}{%- endif %}")
    out = prefix + source
    try:
        ChatTemplate(out, template.tokenizer).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except Exception as e:  # templates that refuse a system role (some Mistral/Gemma ones) raise here
        print(f"warning: the chat template does not accept a system message ({e}); the written template keeps "
              f"its own default, so pass the system prompt explicitly when serving.", file=sys.stderr)
        return source
    return out


def _weights(lm: LoadedModel) -> dict[str, torch.Tensor]:
    if lora_modules(lm.model):
        raise ValueError("save_hf_folder needs a model without LoRA wrappers: merge_lora() first, or save the adapter")
    state = lm.model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}  # FSDP2 DTensors


def plan_shards(state: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most max_bytes (a bigger single tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    item = torch.empty((), dtype=dtype).element_size()
    for name, t in state.items():
        n = t.numel() * item
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_hf_folder(lm: LoadedModel, out_dir: Path, system: str | None = None, max_shard_size: str | int = "5GB",
                   dtype: torch.dtype | None = None) -> None:
    """Write lm as an HF model folder into out_dir (created; earlier weight shards there are removed).

    dtype: the saved weights' dtype (default: the model's own). system: becomes the chat template's default."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _weights(lm)
    dtype = dtype or next(iter(state.values())).dtype
    for old in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a re-export with another shard size must not leave stale shards behind

    shards = plan_shards(state, dtype, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, keys in zip(names, shards):
        part = {k: state[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in keys}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({k: fname for k in keys})
        del part
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    tok = lm.tokenizer
    ids = {k: tok.token_id(tok.special.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
    config = lm.config.to_hf()
    config.pop("dtype", None)  # transformers 5 prefers `dtype`; one key, with the dtype actually written
    config.pop("quantization_config", None)  # a bitsandbytes-stored base is written dequantized
    config["torch_dtype"] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    for k in ("bos", "eos", "pad"):
        if ids[k] is not None:
            config[f"{k}_token_id"] = ids[k]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    tok.save(out_dir, template_with_default_system(lm.template, system))

    gen = {"bos_token_id": ids["bos"], "eos_token_id": list(lm.eos_token_ids) or ids["eos"],
           "pad_token_id": ids["pad"] if ids["pad"] is not None else ids["eos"]}
    gen = {k: v for k, v in gen.items() if v is not None}
    gen.update(lm.generation_defaults)
    if lm.generation_defaults.get("temperature", 0) > 0:
        gen["do_sample"] = True  # transformers ignores (and warns about) temperature/top_p without it
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
