"""Text <-> token ids, through the `tokenizers` library, from tokenizer.json or a GGUF's vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from tunesmith.errors import UserError
from tunesmith.files import read_json

# How a byte-level BPE vocabulary splits text before merging, by GGUF `tokenizer.ggml.pre` name.
# These are the published pre-tokenizer regexes of each family (llama.cpp's llama-vocab.cpp lists the same).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # SmolLM: every digit alone, then GPT-2's regex
    "qwen2": [_QWEN2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "default": [_GPT2_SPLIT],
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """Thin wrapper: encode/decode plus the special tokens the templates and generation need."""

    def __init__(self, tok: HFTokenizer, special: dict[str, str | None]):
        self.tok = tok
        self.special = special  # bos_token / eos_token / pad_token / unk_token -> text (or None)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise UserError(f"{path}: no tokenizer.json; tunesmith needs the fast-tokenizer file beside the weights.")
        tok = HFTokenizer.from_file(str(tj))
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(tok, special)

    @classmethod
    def from_gguf(cls, meta: dict) -> "Tokenizer":
        """Build a byte-level BPE tokenizer from the vocabulary/merges stored in a GGUF file."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UserError(f"GGUF tokenizer type '{kind}' is not supported; tunesmith reads byte-level BPE ('gpt2').")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        alphabet = set(_bytes_to_unicode().values())
        spelling = _bytes_to_unicode()
        vocab = {}
        for i, t in enumerate(tokens):
            vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())] = i
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        splits = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", "default"), _PRE_SPLITS["default"])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        # Token type 3 = control (<|im_start|>...), 4 = user-defined: both must match whole in text.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

        def by_id(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        special = {"bos_token": by_id("bos_token_id"), "eos_token": by_id("eos_token_id"),
                   "pad_token": by_id("padding_token_id"), "unk_token": by_id("unknown_token_id")}
        return cls(tok, special)

    def encode(self, text: str) -> list[int]:
        if len(text) > 16384:  # the same ids; encode_batch lets other threads run meanwhile (encode holds the GIL:
            # a 1 MiB text stalled the server's event loop ~1 s, /health included)
            return self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str,
                            literal: list[tuple[int, int]] = ()) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of `text`. Within the `literal` character spans (text a user wrote), the
        strings of special tokens (`<|im_start|>`, ...) are encoded as plain text, never as the control tokens."""
        enc = self.tok.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        if not literal:
            return ids, offsets
        special = self.special_ids()
        cuts: list[list[int]] = []  # character spans of special tokens that lie inside user text
        for i, (a, b) in zip(ids, offsets):
            if i in special and any(s <= a and b <= e for s, e in literal):
                if cuts and cuts[-1][1] == a:
                    cuts[-1][1] = b
                else:
                    cuts.append([a, b])
        if not cuts:
            return ids, offsets
        pieces, pos = [], 0  # (start, end, plain): text between the cuts as before, the cuts as plain text
        for a, b in cuts:
            pieces += [(pos, a, False), (a, b, True)]
            pos = b
        pieces.append((pos, len(text), False))
        out_ids, out_offsets = [], []
        for start, end, plain in pieces:
            if start < end:
                enc = (self.plain() if plain else self.tok).encode(text[start:end], add_special_tokens=False)
                out_ids += enc.ids
                out_offsets += [(start + a, start + b) for a, b in enc.offsets]
        return out_ids, out_offsets

    def special_ids(self) -> set[int]:
        """Ids of the special (control) tokens: added tokens marked special."""
        if not hasattr(self, "_special_ids"):
            self._special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        return self._special_ids

    def special_texts(self) -> list[str]:
        """The strings of the special tokens, as they appear in text."""
        return [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]

    def plain(self) -> HFTokenizer:
        """A copy of the tokenizer that reads special-token strings as plain text."""
        if not hasattr(self, "_plain"):
            self._plain = HFTokenizer.from_str(self.tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tok.token_to_id(text)

    def save(self, out_dir: Path, chat_template: str | None) -> None:
        """Write tokenizer.json + tokenizer_config.json (used by export and full fine-tuning checkpoints)."""
        self.tok.save(str(out_dir / "tokenizer.json"))
        cfg = {k: v for k, v in self.special.items() if v is not None}
        cfg.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                   model_max_length=131072)
        if chat_template:
            cfg["chat_template"] = chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))


def _token_text(v) -> str | None:
    if isinstance(v, dict):  # {"content": "<|im_end|>", ...} in older tokenizer_config files
        return v.get("content")
    return v
