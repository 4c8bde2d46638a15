"""Chat templates: render messages with the model's own jinja template, and find the assistant tokens.

Rendering follows transformers' `apply_chat_template` (sandboxed jinja2, trim_blocks/lstrip_blocks, the
`raise_exception` / `strftime_now` globals, `tojson` without ASCII escaping), so prompts are byte-identical.

The loss mask is derived from the rendered text, not from template-specific markers: for the i-th assistant
message, the text between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is that
turn's answer plus its end-of-turn token; tokens whose characters fall in those spans are supervised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunesmith.errors import UserError
from tunesmith.text.tokenizer import Tokenizer

# Used when a model ships no chat template (base models): plain ChatML, which Qwen and SmolLM also use.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclass
class Encoded:
    input_ids: list[int]
    labels_mask: list[bool]  # True where the token is part of an assistant turn (loss is taken there)


class ChatTemplate:
    def __init__(self, source: str | None, tokenizer: Tokenizer):
        self.source = source or CHATML
        self.tokenizer = tokenizer
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"the chat template does not parse (line {e.lineno}: {e.message}).")
        self.default_system = self._find_default_system()

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
               ) -> str:
        """The conversation as text; `tools` (OpenAI tool definitions) go to templates that render them, as
        transformers passes them."""
        special = self.tokenizer.special
        extra = {"tools": tools} if tools else {}
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **extra,
            bos_token=special.get("bos_token") or "",
            eos_token=special.get("eos_token") or "",
            pad_token=special.get("pad_token") or "",
            unk_token=special.get("unk_token") or "",
        )

    def _find_default_system(self) -> str | None:
        """The system prompt the template inserts when none is given (e.g. "You are Qwen, created by ...")."""
        marker = "\x00SYSTEM\x00"
        user = [{"role": "user", "content": "hi"}]
        try:
            bare = self.render(user)
            with_sys = self.render([{"role": "system", "content": marker}] + user)
        except Exception:
            return None
        if marker not in with_sys:
            return None
        pre, post = with_sys.split(marker, 1)
        if bare.startswith(pre) and bare.endswith(post) and len(bare) > len(pre) + len(post):
            return bare[len(pre) : len(bare) - len(post)]
        return None

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation followed by the generation prompt (what a model continues)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True, tools=tools))

    def _content_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Where the messages' own text lies in `text` (their rendering), when some message holds the string of a
        special token: that text is then tokenized as plain text (Tokenizer.encode_with_offsets), so a typed
        `<|im_start|>` never becomes a real control token. Found by rendering with each content wrapped in
        markers; a template that alters content so the markers cannot be placed is refused in one sentence."""
        specials = [t for t in self.tokenizer.special_texts() if t]
        found = next((t for m in messages for t in specials if isinstance(m.get("content"), str) and t in m["content"]),
                     None)
        if found is None:
            return []
        open_, close = "\ue000\ue001", "\ue001\ue000"
        marked = self.render([dict(m, content=open_ + m["content"] + close) if isinstance(m.get("content"), str)
                              else m for m in messages])
        spans, plain, pos = [], [], 0
        while True:
            a, b = marked.find(open_, pos), marked.find(close, pos)
            if a < 0 or b < a:
                break
            plain.append(marked[pos:a])
            start = sum(map(len, plain))
            plain.append(marked[a + len(open_):b])
            spans.append((start, start + b - a - len(open_)))
            pos = b + len(close)
        plain.append(marked[pos:])
        if "".join(plain) != text or len(spans) != sum(isinstance(m.get("content"), str) for m in messages):
            raise UserError(f"a message holds the special token {found!r}, which this chat template's rendering "
                            "cannot keep apart from its own; remove it from the data.")
        return spans

    def encode(self, messages: list[dict]) -> Encoded:
        """Token ids of a whole conversation and the mask of assistant tokens (every assistant turn)."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            start, end = len(prefix), len(self.render(messages[: i + 1]))
            turn = text[start:end]
            # The span is answer + end-of-turn token (+ the template's trailing newline, which is not learned).
            end -= len(turn) - len(turn.rstrip("\n"))
            if not text.startswith(prefix) or start >= end:
                raise UserError("the chat template is not prefix-stable, so assistant turns cannot be located; "
                                "use a template that renders earlier turns the same way (e.g. --template chatml).")
            spans.append((start, end))
        ids, offsets = self.tokenizer.encode_with_offsets(text, self._content_spans(messages, text))
        mask = []
        for a, b in offsets:
            mask.append(any(s <= a and b <= e and b > a for s, e in spans))
        return Encoded(ids, mask)
