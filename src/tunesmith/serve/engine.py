"""The engine behind `tunesmith deploy`: one worker thread owns the model; requests reach it through a FIFO queue.

Torch modules are not re-entrant and the active LoRA adapter is module state, so only the worker thread touches
the model. Decoding is continuously batched (generate.DecodeSlots): between steps, queued requests join free rows
of one pre-allocated KV cache in arrival order (their prompt is prefilled), finished and cancelled ones leave, and
each step advances every row by one token at once, so 16 streams cost little more per step than one. The KV
cache's size is fixed at start (--max_num_seqs rows x --max_model_len tokens); requests beyond the free rows wait
in the queue, and beyond --max_concurrency queued + decoding the server answers 429. Each step's text goes back to
the asyncio side with `loop.call_soon_threadsafe` into the request's own asyncio.Queue.

Rows are shared fairly between requests: a free row goes to the waiting request that holds the fewest rows (ties
in arrival order), and a request that already holds a row never takes the last free one, which is kept for a
request that holds none. So one request with hundreds of prompts (or n choices) runs beside other users' chats
instead of ahead of them: a newcomer's first token waits for a step or two, not for the whole batch.

A request stops early when its cancel flag is set (the client disconnected) or its deadline passes; both are
checked before every step, and either way its rows are free for the next request at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from tunesmith.errors import UserError
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.decode.slots import DecodeSlots

log = logging.getLogger("tunesmith.serve")


class EngineBusy(Exception):
    """More requests are in flight than --max_concurrency allows."""


class EngineStopping(EngineBusy):
    """The server is shutting down: no new requests."""


@dataclass
class Failure:
    """What the worker reports when a request cannot finish: an HTTP status and one sentence."""

    status: int
    message: str
    code: str | None = None


class Job:
    """One API request: one or more prompts (n choices, or several completion prompts), each decoded in its own row.

    The worker puts ("delta", choice_index, Delta), ("failure", Failure) and finally ("end", None) on `events`."""

    def __init__(self, adapter: str | None, prompts: list[tuple[list[int], SamplingConfig]], timeout: float):
        self.adapter = adapter
        self.prompts = prompts
        self.deadline = time.monotonic() + timeout
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancelled = threading.Event()
        self._joined = 0  # worker side: prompts given a row so far
        self._done = 0  # worker side: prompts finished

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, kind: str, value=None) -> None:
        _hand_over(self._loop, [(self, (kind, value))])


def _hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[Job, tuple]]) -> None:
    """Put (job, event) items on their jobs' queues from the worker thread: one wake-up of the event loop for all
    of them (a step's tokens for every stream), not one each."""

    def put_all():
        for job, item in items:
            job.events.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
        for job, _ in items:
            job._cancelled.set()


class Engine:
    def __init__(self, generator: Generator, max_requests: int, rows: int, max_len: int,
                 warm_adapter: str | None = None, mix_adapters: bool = False):
        self.batch = DecodeSlots(generator, rows, max_len, mix_adapters=mix_adapters)
        self.max_requests = max_requests  # queued + decoding; more answer 429
        self._warm_adapter = warm_adapter
        self.warm = threading.Event()  # set once the worker has decoded its warm-up answer (or failed to)
        self.warm_error: str | None = None
        self.warm_steps = 0
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self._thread.start()

    @property
    def capacity(self) -> int:
        """Prompt + answer tokens one request may hold."""
        return self.batch.capacity

    @property
    def in_flight(self) -> int:
        with self._cv:
            return self._requests()

    def _requests(self) -> int:
        """Requests queued or decoding (under the lock). A request whose prompts have only partly joined is in
        both lists (the ones with rows already are in _active): it counts once."""
        return len(self._active) + sum(1 for job in self._waiting if job._joined == 0)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise EngineStopping("The server is shutting down; retry on another instance or after it restarts.")
            if self._requests() >= self.max_requests:
                raise EngineBusy(f"the server is busy ({self.max_requests} requests in flight, the --max_concurrency "
                                 f"limit); retry shortly.")
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a request (client gone, or finished): a queued one leaves the queue now, a decoding one before the
        next step. Whoever still awaits its events gets a 499 failure (nginx's 'client closed request')."""
        job._cancelled.set()
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
        job._emit("failure", Failure(499, "the request was cancelled.", "cancelled"))

    def begin_stop(self) -> None:
        """Refuse new requests and end every queued and decoding one (a 503 failure: streams end with an error
        event, then [DONE]) after the step in progress; returns at once."""
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def stop(self) -> None:
        self.begin_stop()
        self._thread.join(timeout=10)

    def warm_up(self) -> None:
        """Decode a few tokens of a one-token prompt before serving: on the GPU the decode step compiles and its
        CUDA graph is recorded on first use (80-85 s for a 7B, bench/infer.py), which would otherwise be the first
        request's wait; and it must happen in this thread, the one that replays the graph. The warmed adapter is
        the one requests get by default; with mix_adapters (several served) every step runs all of them in one
        graph (DecodeSlots), so this warms them all."""
        if self.batch.capacity < 2:  # no room for a prompt and an answer: every request will be refused anyway
            return
        key = object()
        events = self.batch.join(key, [0], SamplingConfig(max_new_tokens=4, min_new_tokens=4), self._warm_adapter)
        while not any(d.finish_reason for _, d in events):
            events = self.batch.step()
            self.warm_steps += 1
        self.batch.leave(key)

    def _run(self) -> None:
        try:
            self.warm_up()
        except Exception as e:  # noqa: BLE001 — reported by the loader, which then stops the server
            log.exception("warming up the decode step failed")
            self.warm_error = f"{type(e).__name__}: {e}"
        self.warm.set()
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._active):
                    self._cv.wait()
                if self._stopping:
                    break
            self._drop_stopped()
            self._admit()
            try:
                events = self.batch.step()
            except Exception as e:  # a bug, not the user's doing: log it, fail what was decoding, keep serving
                log.exception("generation failed")
                self._fail_active(Failure(500, f"generation failed: {type(e).__name__}: {e}", "internal_error"))
                continue
            self._deliver(events)
        with self._cv:
            for job in [*self._active, *self._waiting]:
                job._emit("failure", Failure(503, "the server is shutting down.", "server_shutdown"))
            self._active.clear()
            self._waiting.clear()

    def _drop_stopped(self) -> None:
        """Cancelled and timed-out requests leave their rows."""
        for job in list(self._active):
            if job.cancelled:
                self._leave(job)
            elif time.monotonic() > job.deadline:
                job._emit("failure", Failure(408, "the request took longer than the server's --request_timeout; ask "
                                                  "for fewer tokens or raise the timeout.", "request_timeout"))
                self._leave(job)

    def _admit(self) -> None:
        """Queued requests take free rows (every choice of a request its own row), fairly: each free row goes to the
        waiting request holding the fewest rows, the first to arrive among equals; a request holding rows already
        takes only a row that is not the last free one."""
        while self.batch.free_rows:
            last_row = self.batch.free_rows == 1
            with self._cv:
                held = {job: job._joined - job._done for job in self._waiting}
                ready = [job for job in self._waiting if not (last_row and held[job] > 0)]
                if not ready:
                    return
                job = min(ready, key=held.__getitem__)  # min keeps the first (oldest) of equals
                if job not in self._active:
                    self._active.append(job)
                i = job._joined
                job._joined += 1
                if job._joined == len(job.prompts):
                    self._waiting.remove(job)
            ids, cfg = job.prompts[i]
            try:
                self.batch.join((job, i), ids, cfg, job.adapter)  # its first token comes with the next step
            except UserError as e:
                job._emit("failure", Failure(400, str(e)))
                self._leave(job)
            except Exception as e:
                log.exception("generation failed")
                job._emit("failure", Failure(500, f"generation failed: {type(e).__name__}: {e}", "internal_error"))
                self._leave(job)

    def _deliver(self, events) -> None:
        items = []
        for (job, i), delta in events:
            items.append((job, ("delta", (i, delta))))
            if delta.finish_reason is not None:
                job._done += 1
                if job._done == len(job.prompts):
                    items.append((job, ("end", None)))
                    with self._cv:
                        self._active.remove(job)
        if items:
            _hand_over(items[0][0]._loop, items)  # every job was made on the server's one event loop

    def _leave(self, job: Job) -> None:
        for i in range(len(job.prompts)):
            self.batch.leave((job, i))
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
            if job in self._active:
                self._active.remove(job)

    def _fail_active(self, failure: Failure) -> None:
        for job in list(self._active):
            job._emit("failure", failure)
            self._leave(job)
