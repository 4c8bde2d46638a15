"""Generated tokens as text: streamed pieces that never split a UTF-8 character and never show a stop string, and
the Delta / Completion records that generation hands out."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Delta:
    """One streamed piece: new text; on the last piece, finish_reason is 'stop' or 'length'. logprobs (when the
    answer asked for them): one (token, logprob, top ids, top logprobs) tuple per token taken since the last
    piece that carried them."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[tuple[int, float, list[int], list[float]]] | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


class TextOut:
    """Generated token ids -> streamed text pieces: never half a UTF-8 character, never a stop string (text that may
    be the start of one is held back until it is not).

    Detokenizing is incremental (as TGI and vLLM do): each token decodes only a few-token window, ids[p0:], against
    the text of ids[p0:p1] already known, so a token costs the same at the end of a 2,048-token answer as at its
    start (decoding the whole answer each time cost ~0.2 ms a token on average, per stream)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], ids: list[int] | None = None):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = [] if ids is None else ids
        self.text = ""  # the decoded text of ids[:p1]
        self._p0 = self._p1 = 0
        self.emitted = 0  # characters of self.text already handed out
        self.hold = max((len(x) for x in stop), default=1) - 1

    def _decode_new(self) -> str:
        """Text that the ids after p1 add, or "" while they end inside a UTF-8 character."""
        known = self.tokenizer.decode(self.ids[self._p0 : self._p1])
        window = self.tokenizer.decode(self.ids[self._p0 :])
        if len(window) <= len(known) or window.endswith("\ufffd"):
            return ""
        return window[len(known) :]

    def push(self, tok: int) -> tuple[str, bool]:
        """Add a token: (text now safe to send, whether a stop string has ended the answer)."""
        self.ids.append(tok)
        new = self._decode_new()
        if not new:  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        self.text += new
        self._p0, self._p1 = self._p1, len(self.ids)
        cut = find_stop(self.text, self.stop, self.emitted)
        end, stopped = (cut, True) if cut is not None else (len(self.text) - self.hold, False)
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece, stopped

    def rest(self) -> str:
        """What is still held back, once the answer has ended (up to any stop string)."""
        if self._p1 < len(self.ids):  # trailing ids that never completed a character decode as U+FFFD
            known = self.tokenizer.decode(self.ids[self._p0 : self._p1])
            self.text += self.tokenizer.decode(self.ids[self._p0 :])[len(known) :]
            self._p0, self._p1 = self._p1, len(self.ids)
        cut = find_stop(self.text, self.stop, 0)
        text = self.text if cut is None else self.text[:cut]
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index where the earliest stop string begins, searching from slightly before `start`."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s)))
        if i != -1 and (best is None or i < best):
            best = i
    return best
