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

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        special = self.tokenizer.special
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
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

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation followed by the generation prompt (what a model continues)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True))

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
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        mask = []
        for a, b in offsets:
            mask.append(any(s <= a and b <= e and b > a for s, e in spans))
        return Encoded(ids, mask)
