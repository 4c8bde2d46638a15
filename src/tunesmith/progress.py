"""The one-line progress bar every long phase prints on stderr (training, distillation, the identity check):

    Train [##########--------------] 12/30 loss 1.2345 950 tok/s ETA 0m 18s
    Check [#####-------------------] 36/170 identity questions (tuned) ETA 0m 40s
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
WIDTH = 24


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60}m {s % 60}s" if s >= 3600 else f"{s // 60}m {s % 60}s"


def bar_line(label: str, done: int, total: int, elapsed: float, detail: str = "") -> str:
    filled = int(WIDTH * done / max(total, 1))
    eta = elapsed / max(done, 1) * (total - done)
    return f"{label} [{'#' * filled}{'-' * (WIDTH - filled)}] {done}/{total} {detail + ' ' if detail else ''}ETA {duration(eta)}"


class Progress:
    """A bar over `total` units of work; advance() redraws it, the last unit ends its line. quiet: prints nothing."""

    def __init__(self, label: str, total: int, quiet: bool = False):
        self.label, self.total, self.quiet = label, total, quiet
        self.done, self.detail, self.start = 0, "", time.time()

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        self.done += n
        if detail is not None:
            self.detail = detail
        if self.quiet:
            return
        sys.stderr.write("\r" + bar_line(self.label, self.done, self.total, time.time() - self.start, self.detail) + "   ")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def track(self, items: Iterable[T], detail: str = "") -> Iterator[T]:
        """Yield `items`, advancing one unit per item."""
        for item in items:
            self.advance(1, detail)
            yield item

    def end_line(self) -> None:
        """End an unfinished bar (an error stops the work), so what follows starts a line of its own."""
        if not self.quiet and 0 < self.done < self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()
