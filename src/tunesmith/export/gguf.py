"""Write a loaded model as a GGUF file with the `gguf` package's GGUFWriter (no llama.cpp needed), and an Ollama
Modelfile beside it.

What llama.cpp's convert_hf_to_gguf.py writes, for the architectures tunesmith loads:
  - architecture 'llama' (Llama, Mistral, SmolLM2), 'qwen2' (q/k/v bias), 'qwen3' (q/k norm), with the hparams
    `{arch}.context_length / embedding_length / block_count / feed_forward_length / attention.head_count /
    head_count_kv / key_length / value_length / layer_norm_rms_epsilon / rope.freq_base / rope.dimension_count /
    vocab_size`; llama3 rope scaling as the `rope_freqs.weight` factors, linear as `rope.scaling.*`.
  - tensors named through the inverse of load.GGUF_TO_HF; for 'llama' the q/k rows (and biases) permuted into
    llama.cpp's interleaved rotary layout (load._load_gguf undoes it); 1-D tensors (norms, biases) stay F32.
  - the byte-level BPE vocabulary: tokens exactly as the vocab spells them, token types (control 3 for special
    added tokens, user-defined 4 for other added ones, normal 1, unused 5 for the padding rows a 152,064-row
    Qwen embedding has beyond its 151,665 tokens), merges, bos/eos/pad/unk ids, `tokenizer.ggml.pre`, and the
    chat template with the training system prompt as its default (see export/hf.py).
  - the end-of-turn token (`tokenizer.ggml.eot_token_id`: the token the template closes an assistant turn with,
    <|im_end|> for ChatML) beside the eos id, so llama.cpp stops an answer where tunesmith does instead of
    guessing the token from its text.

Weight types (--gguf_type): f32, f16, bf16, q8_0 (blocks of 32: int8 values times an f16 scale) and q4_0 (blocks
of 32: 4-bit values times an f16 scale, llama.cpp's reference rounding through gguf.quants). Norms and biases stay
F32; rows that are not whole 32-value blocks are written F16. In a q4_0 file the token embedding and the output
matrix are Q8_0: llama.cpp's own Q4_0 recipe keeps these two at 6 bits (Q6_K), because 4-bit rounding there
costs the most (a tied embedding is both).

Tensors are written one at a time (GGUFWriter.add_tensor_info for all, then write_tensor_data each), so RAM holds
one fp32 tensor copy at most.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import UserError
from tunesmith.export.hf import template_with_default_system
from tunesmith.model.decoder import rope_inv_freq
from tunesmith.model.gguf_file import GGUFFile
from tunesmith.model.load import LoadedModel, hf_to_gguf_name
from tunesmith.text.tokenizer import _PRE_SPLITS

GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3"}
MERGED_KEY = "tunesmith.merged_adapters"  # sha256 of every adapter merged into these weights (export/merge.py)


def gguf_types():
    """--gguf_type -> (ggml type of 2-D tensors, general.file_type)."""
    from gguf import GGMLQuantizationType as Q, LlamaFileType as F

    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf.py's permute).
    w: (n_heads * hd, ...) weight or (n_heads * hd,) bias."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer_name(lm: LoadedModel) -> str:
    """llama.cpp's name of the pre-tokenizer regex: the source GGUF's when the model came from one, else
    recognized from tokenizer.json's pre_tokenizer (the regexes text/tokenizer.py builds per name)."""
    if lm.path.suffix.lower() == ".gguf":
        pre = GGUFFile(lm.path).metadata.get("tokenizer.ggml.pre")
        if pre:
            return pre
    pre = json.loads(lm.tokenizer.tok.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    for name, regexes in _PRE_SPLITS.items():
        if splits == regexes:
            return name
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex"):
        return "smollm"  # the original SmolLM2 tokenizer.json
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    fallback = "qwen2" if lm.config.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") else "gpt2"
    print(f"warning: the tokenizer's pre-tokenizer is not one tunesmith recognizes; the GGUF says "
          f"tokenizer.ggml.pre='{fallback}'.", file=sys.stderr)
    return fallback


def end_of_turn_id(lm: LoadedModel) -> int | None:
    """The special token the chat template writes right after an assistant message's content (<|im_end|> for
    ChatML, <|eot_id|> for Llama 3, </s> for Mistral); None when the template writes none."""
    marker = "\u2063tunesmith\u2063"
    try:
        text = lm.template.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
    except Exception:  # templates that raise on some conversations: nothing to read off
        return None
    if marker not in text:
        return None
    ids = lm.tokenizer.encode(text.split(marker, 1)[1].lstrip(" "))
    return ids[0] if ids and ids[0] in lm.tokenizer.special_ids() else None


def stop_token_ids(lm: LoadedModel) -> list[int]:
    """Every token an answer ends at: the generation eos ids, the tokenizer's eos and the end-of-turn token."""
    tok = lm.tokenizer
    ids = [*lm.eos_token_ids, tok.token_id(tok.special.get("eos_token")), end_of_turn_id(lm)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def tokenizer_metadata(lm: LoadedModel, system: str | None) -> dict:
    """The tokenizer.* keys, values as GGUFWriter.add_* takes them."""
    from gguf import TokenType

    tj = json.loads(lm.tokenizer.tok.to_str())
    model = tj["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{lm.path}: GGUF export writes byte-level BPE vocabularies (Qwen, Llama 3, SmolLM); this "
                        f"model's tokenizer is {model.get('type')} with byte fallback (SentencePiece style).")
    n = lm.config.vocab_size
    tokens: list[str | None] = [None] * n
    types = [int(TokenType.UNUSED)] * n
    entries = [(i, t, int(TokenType.NORMAL)) for t, i in model["vocab"].items()]
    entries += [(a["id"], a["content"], int(TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED))
                for a in tj.get("added_tokens", [])]
    for i, text, kind in entries:
        if i >= n:
            raise UserError(f"{lm.path}: token {text!r} has id {i}, past the {n} embedding rows; llama.cpp needs one "
                            f"row per token.")
        tokens[i], types[i] = text, kind
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]  # as llama.cpp's converter pads
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok = lm.tokenizer
    ids = {k: tok.token_id(tok.special.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
    if ids["eos"] is None and lm.eos_token_ids:
        ids["eos"] = lm.eos_token_ids[0]
    probe = tok.tok.encode("a", add_special_tokens=True).ids
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_tokenizer_name(lm),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(probe) and ids["bos"] is not None and probe[0] == ids["bos"],
        "tokenizer.chat_template": template_with_default_system(lm.template, system),
    }
    ids["eot"] = end_of_turn_id(lm)
    for key, gkey in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id"), ("eot", "eot_token_id")):
        if ids[key] is not None:
            meta[f"tokenizer.ggml.{gkey}"] = ids[key]
    return meta


def _tensors(lm: LoadedModel, arch: str):
    """(gguf name, tensor) in write order, llama q/k permuted; plus llama3 rope factors."""
    cfg = lm.config
    state = lm.model.state_dict()
    for name, t in state.items():
        g = hf_to_gguf_name(name)
        if g is None:
            raise UserError(f"tensor {name} has no GGUF name; this model cannot be written as GGUF.")
        if arch == "llama" and g.split(".")[-2] in ("attn_q", "attn_k"):
            t = permute_qk(t, cfg.num_heads if ".attn_q." in g else cfg.num_kv_heads)
        yield g, t
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3":
        # llama.cpp divides each rotary frequency by its factor: factor = unscaled / scaled inverse frequency.
        plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
        yield "rope_freqs.weight", plain / rope_inv_freq(cfg)


def write_gguf(lm: LoadedModel, path: Path, gguf_type: str = "f16", system: str | None = None,
               name: str | None = None, merged_adapters: list[str] | None = None) -> Path:
    """Write lm (merged, no LoRA wrappers) to `path` as GGUF of `gguf_type` (f32 | f16 | bf16 | q8_0 | q4_0)."""
    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    cfg = lm.config
    arch = GGUF_ARCH.get(cfg.architecture)
    if arch is None:
        raise UserError(f"architecture {cfg.architecture} has no GGUF writer here (supported: {', '.join(GGUF_ARCH)}).")
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] not in ("llama3", "linear"):
        raise UserError(f"rope_scaling '{cfg.rope_scaling['rope_type']}' cannot be written to GGUF here.")
    if gguf_type not in gguf_types():
        raise UserError(f"--gguf_type '{gguf_type}' is not one of {', '.join(gguf_types())}.")
    qtype, file_type = gguf_types()[gguf_type]

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(name or lm.path.stem)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    sizes = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
             "block_count": cfg.num_layers, "feed_forward_length": cfg.intermediate_size,
             "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
             "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim}
    for key, value in sizes.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_uint32(f"{arch}.rope.dimension_count", cfg.head_dim)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", cfg.rope_scaling["factor"])
    for key, value in tokenizer_metadata(lm, system).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    if merged_adapters:
        w.add_array(MERGED_KEY, merged_adapters)

    def kind(name: str, t: torch.Tensor):
        if t.dim() == 1:
            return Q.F32
        q = Q.Q8_0 if qtype == Q.Q4_0 and name in ("token_embd.weight", "output.weight") else qtype
        if q in (Q.Q8_0, Q.Q4_0) and t.shape[-1] % GGML_QUANT_SIZES[q][0]:
            return Q.F16  # rows not a whole number of 32-value blocks: llama.cpp falls back the same way
        return q

    def nbytes(t: torch.Tensor, q) -> int:
        block, size = GGML_QUANT_SIZES[q]
        return t.numel() // block * size

    for g, t in _tensors(lm, arch):  # pass 1: the tensor table (shapes and sizes only, no data)
        w.add_tensor_info(g, tuple(t.shape), np.dtype(np.float32), nbytes(t, kind(g, t)), raw_dtype=kind(g, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for g, t in _tensors(lm, arch):  # pass 2: one tensor at a time
        data = gguf.quants.quantize(t.detach().to("cpu", torch.float32).numpy(), kind(g, t))
        w.write_tensor_data(data)
    w.close()
    os.replace(tmp, path)
    return path


CHATML_OLLAMA_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def write_modelfile(out_dir: Path, gguf_path: Path, lm: LoadedModel, system: str | None) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f Modelfile`. ChatML models get their template in
    Go template syntax (Ollama derives other templates from the GGUF's own chat template)."""
    system = system if system is not None else lm.template.default_system
    lines = [f"FROM ./{gguf_path.name}", ""]
    if "<|im_start|>" in lm.template.source:
        lines += [f'TEMPLATE """{CHATML_OLLAMA_TEMPLATE}"""', ""]
    if system:
        if '"""' in system:
            raise UserError('the system prompt contains """, which an Ollama Modelfile cannot quote; rephrase it.')
        lines += [f'SYSTEM """{system}"""', ""]
    for i in stop_token_ids(lm):  # generation ends at these (<|im_end|> for ChatML, and <|endoftext|> for Qwen)
        lines.append(f'PARAMETER stop "{lm.tokenizer.tok.id_to_token(i)}"')
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    for k, v in lm.generation_defaults.items():
        lines.append(f"PARAMETER {names[k]} {v}")
    path = Path(out_dir) / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
