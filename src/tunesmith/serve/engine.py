"""The engine behind `tunesmith deploy`: one worker thread owns the model; requests reach it through a FIFO queue.

Torch modules are not re-entrant and the active LoRA adapter is module state, so only the worker thread touches
the model. Requests are admitted in arrival order into up to ACTIVE_STREAMS slots (one when the Generator decodes
through its single compiled static cache); the active ones advance one streamed piece (about one token) each in
turn, so a long answer does not hold a short one back, and the adapter is switched before a step whenever the next
request needs a different one. Each step's text goes back to the asyncio side with `loop.call_soon_threadsafe`
into the request's own asyncio.Queue.

A request stops early when its cancel flag is set (the client disconnected) or its deadline passes; both are
checked before every step, and either way its slot is free for the next request at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from tunesmith.errors import UserError
from tunesmith.generate import Delta, Generator, SamplingConfig
from tunesmith.model.lora import set_active_adapter

log = logging.getLogger("tunesmith.serve")

# Streams decoded interleaved. Each holds its own KV cache of (prompt + max_tokens) positions, and more streams
# do not raise throughput without batching, only spread it; 4 keeps short answers quick behind long ones.
ACTIVE_STREAMS = 4


class EngineBusy(Exception):
    """More requests are in flight than --max_concurrency allows."""


@dataclass
class Failure:
    """What the worker reports when a request cannot finish: an HTTP status and one sentence."""

    status: int
    message: str
    code: str | None = None


class Job:
    """One API request: prompts decoded one after another (n choices, or several completion prompts).

    The worker puts ("delta", choice_index, Delta), ("failure", Failure) and finally ("end", None) on `events`."""

    def __init__(self, adapter: str | None, prompts: list[tuple[list[int], SamplingConfig]], timeout: float):
        self.adapter = adapter
        self.prompts = prompts
        self.deadline = time.monotonic() + timeout
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancelled = threading.Event()
        self._next = 0  # worker side: which prompt is being decoded
        self._stream = None  # worker side: its running Generator.stream

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, kind: str, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            self._cancelled.set()

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class Engine:
    def __init__(self, generator: Generator, max_requests: int):
        self.generator = generator
        self.max_requests = max_requests  # queued + decoding; more answer 429
        # A compiled Generator decodes every stream through its one static KV cache (and the CUDA graphs recorded
        # on it), so interleaved streams would overwrite each other: it serves one request at a time.
        self.slots = 1 if getattr(generator, "compiled", False) else ACTIVE_STREAMS
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._adapter: object = object()  # unknown until the first step sets it
        self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self._waiting) + len(self._active)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise EngineBusy("the server is shutting down.")
            if len(self._waiting) + len(self._active) >= self.max_requests:
                raise EngineBusy(f"the server is busy ({self.max_requests} requests in flight, the --max_concurrency "
                                 f"limit); retry shortly.")
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a request (client gone, or finished): a queued one leaves the queue now, a decoding one before its
        next step. Whoever still awaits its events gets a 499 failure (nginx's 'client closed request')."""
        job._cancelled.set()
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
        job._emit("failure", Failure(499, "the request was cancelled.", "cancelled"))

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._active):
                    self._cv.wait()
                if self._stopping:
                    break
                while self._waiting and len(self._active) < self.slots:
                    self._active.append(self._waiting.popleft())
                active = list(self._active)
            for job in active:
                if not self._step(job):
                    job._close()
                    with self._cv:
                        self._active.remove(job)
        with self._cv:
            for job in [*self._active, *self._waiting]:
                job._close()
                job._emit("failure", Failure(503, "the server is shutting down.", "server_shutdown"))
            self._active.clear()
            self._waiting.clear()

    def _step(self, job: Job) -> bool:
        """Advance one request by one streamed piece; False when it is finished (or failed, or cancelled)."""
        if job.cancelled:
            return False
        if time.monotonic() > job.deadline:
            job._emit("failure", Failure(408, "the request took longer than the server's --request_timeout; ask for "
                                              "fewer tokens or raise the timeout.", "request_timeout"))
            return False
        try:
            if job._stream is None:
                ids, cfg = job.prompts[job._next]
                job._stream = self.generator.stream(ids, cfg)
            if self._adapter != job.adapter:
                set_active_adapter(self.generator.model, job.adapter)
                self._adapter = job.adapter
            delta: Delta = next(job._stream)
        except UserError as e:
            job._emit("failure", Failure(400, str(e)))
            return False
        except Exception as e:  # a bug, not the user's doing: log it, answer 500, keep serving others
            log.exception("generation failed")
            job._emit("failure", Failure(500, f"generation failed: {type(e).__name__}: {e}", "internal_error"))
            return False
        job._emit("delta", (job._next, delta))
        if delta.finish_reason is None:
            return True
        job._close()
        job._next += 1
        if job._next < len(job.prompts):
            return True
        job._emit("end")
        return False
