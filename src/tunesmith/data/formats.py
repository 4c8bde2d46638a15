"""One dataset row → one conversation: a list of OpenAI-style messages {"role", "content"}.

The row's format is recognised by its fields, in this order (as ms-swift does):
  messages        {"messages": [{"role", "content"}, ...]}; content is a string or a list of text parts
  sharegpt        {"conversations": [{"from", "value"} or {"role", "content"}, ...], "system"?}
  alpaca          {"instruction", "input"?, "output", "system"?, "history"? [[query, answer], ...]}
  query/response  {"query", "response", "system"?, "history"?}

Every conversation that comes out is: an optional system message, then user and assistant turns
alternating, starting with the user and ending with an assistant answer. Anything else is a UserError
that names the row (`where`, e.g. "data.json row 3") and the field.

Nested fields (history, conversations, messages) may also be JSON text, so a CSV cell can hold them.
"""

from __future__ import annotations

import json

from tunesmith.errors import UserError

# sharegpt speaker names → OpenAI roles ("human"/"gpt" in the original ShareGPT dumps).
SPEAKER_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}

FORMAT_HINT = "give each row 'messages', 'conversations', 'instruction' and 'output', or 'query' and 'response'"


def to_messages(row: dict, where: str, answer: bool = True) -> list[dict]:
    """Convert one row (any supported format) to a validated list of {"role", "content"} messages.

    answer=False (batch inference's rows): the row may stop at a user turn, with no answer to learn."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is a {_kind(row)}, not an object with fields; {FORMAT_HINT}.")
    if "messages" in row:
        messages = _from_openai(row, where)
    elif "conversations" in row:
        messages = _from_sharegpt(row, where)
    elif "instruction" in row or "output" in row:
        messages = _from_alpaca(row, where, answer)
    elif "query" in row or "response" in row:
        messages = _from_query_response(row, where, answer)
    else:
        fields = ", ".join(repr(k) for k in row) or "none"
        raise UserError(f"{where} has no field this tool knows (its fields: {fields}); {FORMAT_HINT}.")
    _check_turns(messages, where, answer)
    return messages


def _from_openai(row: dict, where: str) -> list[dict]:
    entries = _nested_list(row, "messages", where)
    messages = []
    for i, entry in enumerate(entries, 1):
        entry_where = f"{where}, messages[{i}]"
        if not isinstance(entry, dict) or "role" not in entry or "content" not in entry:
            raise UserError(f"{entry_where} needs the fields 'role' and 'content'; write it as "
                            '{"role": "user", "content": "..."}.')
        messages.append({"role": _role(entry["role"], entry_where, "role"),
                         "content": _content(entry["content"], entry_where)})
    return messages


def _from_sharegpt(row: dict, where: str) -> list[dict]:
    entries = _nested_list(row, "conversations", where)
    messages = _system(row, where)
    for i, entry in enumerate(entries, 1):
        entry_where = f"{where}, conversations[{i}]"
        if isinstance(entry, dict) and "from" in entry and "value" in entry:
            role, content = _role(entry["from"], entry_where, "from"), entry["value"]
        elif isinstance(entry, dict) and "role" in entry and "content" in entry:
            role, content = _role(entry["role"], entry_where, "role"), entry["content"]
        else:
            raise UserError(f"{entry_where} needs the fields 'from' and 'value' (or 'role' and 'content'); "
                            'write it as {"from": "human", "value": "..."}.')
        messages.append({"role": role, "content": _content(content, entry_where)})
    return messages


def _from_alpaca(row: dict, where: str, answer: bool = True) -> list[dict]:
    instruction = _text_field(row, "instruction", where)
    input_ = _text_field(row, "input", where)
    # ms-swift joins the two with a newline only when both are present.
    query = f"{instruction}\n{input_}" if instruction and input_ else instruction or input_
    if not query.strip():
        raise UserError(f"{where} has an empty 'instruction' (and no 'input'); write the question in 'instruction'.")
    return _one_turn(row, where, query, "output", answer)


def _from_query_response(row: dict, where: str, answer: bool = True) -> list[dict]:
    query = _text_field(row, "query", where)
    if not query.strip():
        raise UserError(f"{where} has no 'query'; write the question in 'query' and the answer in 'response'.")
    return _one_turn(row, where, query, "response", answer)


def _one_turn(row: dict, where: str, query: str, answer_field: str, answer: bool = True) -> list[dict]:
    """System prompt, earlier turns (`history`), then this row's question and the answer in `answer_field`
    (left out where answer=False and the row has none)."""
    turns = _system(row, where) + _history(row, where) + [{"role": "user", "content": query}]
    if not answer and row.get(answer_field) in (None, ""):
        return turns
    return turns + [{"role": "assistant", "content": _answer(row, answer_field, where)}]


def _system(row: dict, where: str) -> list[dict]:
    system = _text_field(row, "system", where)
    return [{"role": "system", "content": system}] if system else []


def _history(row: dict, where: str) -> list[dict]:
    """`history` is [[query, answer], ...]: earlier turns of the same conversation."""
    if row.get("history") in (None, ""):
        return []
    messages = []
    for i, pair in enumerate(_nested_list(row, "history", where), 1):
        pair_where = f"{where}, history[{i}]"
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise UserError(f"{pair_where} is not a [question, answer] pair; write history as [[\"q\", \"a\"], ...].")
        messages.append({"role": "user", "content": _content(pair[0], pair_where)})
        messages.append({"role": "assistant", "content": _content(pair[1], pair_where)})
    return messages


def _text_field(row: dict, field: str, where: str) -> str:
    """An optional text field: missing or null (empty CSV/Parquet cell) reads as ''."""
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}, field '{field}' is a {_kind(value)}, not text; put the value in quotes.")
    return value


def _answer(row: dict, field: str, where: str) -> str:
    if field not in row:
        raise UserError(f"{where} has no '{field}' field; add the answer the model should learn as '{field}'.")
    answer = _text_field(row, field, where)
    if not answer.strip():
        raise UserError(f"{where}, field '{field}' is empty; write the answer the model should learn there.")
    return answer


def _nested_list(row: dict, field: str, where: str) -> list:
    value = row[field]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}, field '{field}' is text that is not a JSON list; "
                            f"write it as a list (or as JSON text of one).") from None
        except RecursionError:
            raise UserError(f"{where}, field '{field}' holds JSON nested too deeply to read; "
                            f"write it as a flat list of turns.") from None
    if not isinstance(value, list):
        raise UserError(f"{where}, field '{field}' is a {_kind(value)}, not a list; write it as a list.")
    return value


def _role(speaker, where: str, field: str) -> str:
    role = SPEAKER_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise UserError(f"{where} has {field} {speaker!r}, which is not supported; "
                        "use system, user (human) or assistant (gpt).")
    return role


def _content(content, where: str) -> str:
    """A message content: a string, or OpenAI text parts [{"type": "text", "text": ...}], joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise UserError(f"{where} has a content part that is not text ({_short(part)}); "
                                "only {\"type\": \"text\", \"text\": \"...\"} parts are supported.")
            texts.append(part["text"])
        return "\n".join(texts)
    raise UserError(f"{where} has content that is a {_kind(content)}, not text; write it as a string.")


def _check_turns(messages: list[dict], where: str, answer: bool = True) -> None:
    """Optional system first, then user/assistant alternating, ending with a non-empty assistant answer (or, with
    answer=False, with a user turn too); every turn has text, and all text is encodable (no lone surrogates)."""
    for i, message in enumerate(messages, 1):
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            bad = message["content"][e.start]
            raise UserError(f"{where}: message {i} ({message['role']}) holds a lone surrogate \\u{ord(bad):04x} at "
                            f"character {e.start + 1}, which is not a character; fix that escape in the "
                            f"file.") from None
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if answer and not any(m["role"] == "assistant" for m in turns):
        raise UserError(f"{where} has no assistant turn; add the answer the model should learn.")
    if not turns:
        raise UserError(f"{where} has no user turn; add the question to answer.")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise UserError(f"{where}: turn {i + 1} is from the {message['role']} where the {expected} should speak; "
                            "after an optional system message, turns must alternate between user and assistant.")
    if answer and turns[-1]["role"] != "assistant":
        raise UserError(f"{where} ends with a user turn; end the conversation with the assistant's answer.")
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"].strip():
        raise UserError(f"{where} ends with an empty assistant answer; write the answer the model should learn.")
    for i, message in enumerate(turns, 1):
        if not message["content"].strip():
            raise UserError(f"{where}: turn {i} ({message['role']}) is empty or only whitespace; write its text there, "
                            f"or remove the turn.")


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
