"""Tool calling for `tunesmith deploy`: OpenAI's tool definitions and tool messages into the model's chat
template, and the model's tool-call text back into OpenAI `tool_calls`.

The tool-call text is the Hermes form that Qwen2.5 is trained on, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that renders tools itself (it reads the `tools` variable, as Qwen2.5's does) gets them with the
messages as they are: assistant `tool_calls` (arguments as objects) and `tool` messages. Any other template (SmolLM2's,
plain ChatML) gets the system-prompt form instead: TOOLS_PROMPT with the tool definitions, one JSON per line, is
appended to the system message; an assistant message's calls become the blocks above after its text; each run of
`tool` messages becomes one user message of `<tool_response>` blocks. decode/grammar.py's `tool_calls` grammar
generates exactly this form, so a forced call (`tool_choice` "required" or a named function) always parses.
"""

from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"

TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)

_USES_TOOLS = re.compile(r"\btools\b")


def template_renders_tools(source: str) -> bool:
    """Whether a chat template renders tool definitions itself (it reads the `tools` variable)."""
    return bool(_USES_TOOLS.search(source))


def call_text(name: str, arguments) -> str:
    """One call as the model writes it (arguments: an object or its JSON text)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{CLOSE}'


def _arguments_object(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def for_template(messages: list[dict], tools: list[dict] | None, native: bool, system: str | None
                 ) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to render with a chat template. messages: OpenAI-shaped dicts (role, content text,
    optional tool_calls [{id, type, function: {name, arguments}}], tool_call_id). native: the template renders
    tools itself (template_renders_tools); else the system-prompt form. system: the system prompt used when the
    conversation has none (None: the template's default is lost in the system-prompt form, so it is passed)."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": _arguments_object(c["function"].get("arguments"))}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, tools or None
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"].get("arguments") or "{}") for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    out = [{k: v for k, v in m.items() if k != "_tool_responses"} for m in out]
    if tools:
        listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + listing).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": ((system + "\n\n") if system else "") + listing})
    return out, None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call_of(body: str) -> dict | None:
    """{"name", "arguments" (JSON text)} from a block's JSON, or None when it is not a call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a whole answer: the text outside well-formed call blocks (None when only whitespace)
    and OpenAI tool_calls [{id, type, function: {name, arguments}}]. A block whose JSON is not a call stays text."""
    stream = ToolCallStream()
    events = stream.feed(text) + stream.finish()
    content = "".join(e[1] for e in events if e[0] == "content").strip()
    calls = [e[1] for e in events if e[0] == "call"]
    return content or None, calls


class ToolCallStream:
    """Streamed answer text -> ("content", text) and ("call", {id, type, function}) events: text that may be the
    start of a call block is held until it is known; whitespace around calls is dropped."""

    def __init__(self):
        self._buf = ""
        self._in_call = False
        self._space = ""  # whitespace held back: it is content only if more content follows
        self.calls = 0

    def _content(self, text: str) -> list[tuple]:
        if not text:
            return []
        if not text.strip():
            self._space += text
            return []
        out = self._space + text
        stripped = out.rstrip()
        self._space = out[len(stripped):]
        return [("content", stripped)]

    def _call(self, body: str) -> list[tuple]:
        call = _call_of(body.strip())
        if call is None:
            return self._content(OPEN + body + CLOSE)
        self._space = ""
        self.calls += 1
        return [("call", {"id": new_call_id(), "type": "function", "function": call})]

    def feed(self, piece: str) -> list[tuple]:
        self._buf += piece
        out: list[tuple] = []
        while True:
            if self._in_call:
                end = self._buf.find(CLOSE)
                if end < 0:
                    return out
                out += self._call(self._buf[:end])
                self._buf, self._in_call = self._buf[end + len(CLOSE):], False
            else:
                start = self._buf.find(OPEN)
                if start >= 0:
                    out += self._content(self._buf[:start])
                    self._buf, self._in_call = self._buf[start + len(OPEN):], True
                    continue
                keep = next((n for n in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                             if OPEN.startswith(self._buf[-n:])), 0)
                out += self._content(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return out

    def finish(self) -> list[tuple]:
        """The end of the answer: an unclosed block is a call if its JSON is whole, else text."""
        buf, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            call = _call_of(buf.strip())
            if call is not None:
                self.calls += 1
                return [("call", {"id": new_call_id(), "type": "function", "function": call})]
            return self._content(OPEN + buf)
        return self._content(buf)
