"""Generation slots: each slot runs one request at a time in its own worker thread.

A slot's model is a `Model` loaded with parallel=1 (one per slot), or one `Model` loaded with parallel=N given to
all N slots (`r1v serve`: its scheduler batches the N streams over one copy of the weights). Decoding blocks, so
the event loop never calls a model: a `Job` iterates `Model.stream` in a worker thread and hands the chunks to the
loop through an asyncio queue. Admission is bounded
(`slots` running + `queue` waiting); a request beyond that is refused at once with 429 rather than piling up.
Cancelling a job (the client went away) stops it at the next token: the thread closes the stream, which ends the
llama.cpp run, and the slot goes back to the pool.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from .protocol import APIError

__all__ = ["ClientGone", "Job", "SlotPool", "SlotStats"]


class ClientGone(Exception):
    """The client disconnected while its request waited for a slot."""


@dataclass(frozen=True)
class SlotStats:
    """For `/health`: slots in use, requests waiting, and counts since start."""

    slots: int
    busy: int
    queue: int
    waiting: int
    completed: int
    cancelled: int
    refused: int


class Job:
    """One request on one slot. The worker thread pushes ("started"|"chunk"|"error"|"end", value) items."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_finish: Callable[[], None] = lambda: None):
        self._loop = loop
        self._items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancel = threading.Event()
        self._on_finish: Callable[[], None] | None = on_finish
        self.cancelled = False  # set by the worker when it stopped early because of cancel()

    def finish(self) -> None:
        """The request is over (answered, failed or abandoned): it leaves the admission count. Called by the
        handler before the client sees the end of its response - so a client that sends its next request at
        once is not refused for a slot the worker is still handing back - and, at the latest, when the worker
        is done (idempotent; on the loop)."""
        if self._on_finish is not None:
            callback, self._on_finish = self._on_finish, None
            callback()

    def cancel(self) -> None:
        """Stop at the next token (thread-safe, idempotent)."""
        self._cancel.set()

    def _emit(self, kind: str, value: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancel.set()

    def work(self, model: Any, messages: list[dict[str, Any]], sampling: dict[str, Any]) -> None:
        """Runs in the worker thread."""
        try:
            stream = model.stream(messages, **sampling)  # renders, loads images, fills the context: may raise
        except BaseException as e:
            self._emit("error", e)
            return
        self._emit("started")
        try:
            for chunk in stream:
                if self._cancel.is_set():
                    self.cancelled = True
                    break
                self._emit("chunk", chunk)
        except BaseException as e:
            self._emit("error", e)
        finally:
            stream.close()  # ends the llama.cpp run (also when cancelled mid-way)
            self._emit("end")

    async def started(self) -> None:
        """Wait until generation has begun; raise what the model raised before decoding (bad image, context)."""
        kind, value = await self._items.get()
        if kind == "error":
            raise value

    async def chunks(self) -> AsyncIterator[Any]:
        """The `StreamChunk` s; raises what the model raised mid-way."""
        while True:
            kind, value = await self._items.get()
            if kind == "chunk":
                yield value
            elif kind == "error":
                raise value
            else:
                return


class SlotPool:
    """`models` (one per slot, each used by one thread at a time) and a bounded waiting room of `queue`."""

    def __init__(self, models: Sequence[Any], queue: int = 0):
        if not models:
            raise ValueError("a SlotPool needs at least one model")
        if queue < 0:
            raise ValueError(f"queue must be >= 0, got {queue}")
        self.models = list(models)
        self.queue = queue
        self._executor = ThreadPoolExecutor(len(self.models), thread_name_prefix="r1v-slot")
        self._free: list[Any] = list(self.models)
        self._waiters: deque[asyncio.Future[Any]] = deque()  # requests waiting for a model, first come first served
        self._admitted = 0  # running + waiting
        self._running: set[Job] = set()
        self._completed = self._cancelled = self._refused = 0
        self.closed = False

    @property
    def capacity(self) -> int:
        return len(self.models) + self.queue

    def stats(self) -> SlotStats:
        busy = len(self._running)
        return SlotStats(len(self.models), busy, self.queue, max(0, self._admitted - busy), self._completed,
                         self._cancelled, self._refused)

    def _give_back(self, model: Any) -> None:
        """Hand the model to the longest-waiting request, else keep it free (on the loop)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # skip waits given up (client gone)
                waiter.set_result(model)
                return
        self._free.append(model)

    async def submit(self, messages: list[dict[str, Any]], sampling: dict[str, Any], gone: asyncio.Event) -> Job:
        """Admit the request (or raise APIError 429/503 at once), wait for a slot, start generating; return the
        running Job once decoding has begun. `gone` is set when the client disconnects. The caller calls
        `job.finish()` when done with the job (its request leaves the count then)."""
        if self.closed:
            raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
        if self._admitted >= self.capacity:
            self._refused += 1
            raise APIError(429, f"the server is busy: {len(self.models)} generation slot(s) in use and "
                                f"{self.queue} request(s) waiting; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self._admitted += 1
        try:
            model = await self._acquire(gone)
        except BaseException:
            self._admitted -= 1
            raise
        loop = asyncio.get_running_loop()
        job = Job(loop, on_finish=self._leave)
        self._running.add(job)
        # The client leaving at any time until the job ends stops it (at its next token).
        gone_watch = asyncio.ensure_future(gone.wait())
        gone_watch.add_done_callback(lambda t: t.cancelled() or job.cancel())

        def release(_: Any) -> None:  # on the loop, once the worker thread is done with the model
            gone_watch.cancel()
            self._running.discard(job)
            job.finish()
            if job.cancelled:
                self._cancelled += 1
            else:
                self._completed += 1
            self._give_back(model)

        future = loop.run_in_executor(self._executor, job.work, model, messages, sampling)
        future.add_done_callback(release)
        try:
            await job.started()
        except BaseException:
            job.cancel()
            job.finish()
            raise
        return job

    def _leave(self) -> None:
        self._admitted -= 1

    async def _acquire(self, gone: asyncio.Event) -> Any:
        """A free model, or ClientGone if the client leaves first. Waiters are served in arrival order (a new
        request never takes a model ahead of one already waiting), and a model handed to a wait that is being
        cancelled goes back to the pool."""
        self._waiters = deque(w for w in self._waiters if not w.done())
        if self._free and not self._waiters:
            return self._free.pop()
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        gone_wait = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({waiter, gone_wait}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())
            waiter.cancel()
            raise
        finally:
            gone_wait.cancel()
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        raise ClientGone()

    def close(self) -> None:
        """Stop running jobs at their next token and the worker threads after them."""
        self.closed = True
        for job in list(self._running):
            job.cancel()
        self._executor.shutdown(wait=True)
