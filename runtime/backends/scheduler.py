"""Continuous batching: several requests over one copy of the model, one forward per token for all of them.

A `Scheduler` drives a `BaseBackend` whose engine holds several sequences in one context (`multi_sequence`,
`LoadOptions.parallel` of them). One worker thread owns the engine; every engine call happens there. Callers
(any thread) `submit` a prepared prompt and iterate the returned `Run`; the worker, at each iteration:

1. runs the calls handed to it (`call`: preparing a prompt between steps; `exclusive=True` waits until no
   request is running: `logprobs`, `reset`);
2. admits waiting requests onto free sequences, first come first served - each takes the free sequence whose
   cached positions share the longest prefix with its prompt, when that is at least half of it (a follow-up
   turn finds its conversation), else the least recently used one (`_pick`); keeps that prefix or restores a
   saved one (`BaseBackend._begin`), and encodes its images (the others wait for that encoding);
3. evaluates the next prompt span of each request still in its prompt, at most `n_batch` prompt positions in
   all per iteration (a long prompt is spread over iterations and does not stall the others); the span that
   ends a prompt gives its first token;
4. advances every decoding request by one token in ONE `_step_batch`, and samples each with its own sampler.

A request leaves when it ends (end token, `max_new`) or its `Run` is closed (cancelled: it leaves at the next
iteration); its sequence keeps what it evaluated, for the next request's prefix. Requests beyond the number of
sequences wait in a queue (unbounded here; `r1v serve` bounds admission itself). Sampling, stop strings, seed
and the reasoning split are per request: the sampler here, the rest in the caller's stream (`api.Model`).
Timings (`RunStats`) count from the request's admission onto a sequence.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..options import SamplingParams
from .base import BaseBackend, Request, SequenceState, common_prefix
from .prompt import Prompt, Run, Span

__all__ = ["Scheduler"]

_END = object()


class SchedulerClosed(RuntimeError):
    """The model was closed while the request waited or ran."""


@dataclass
class _Job:
    """A submitted request and where it is: waiting, in its prompt (`span` next), or decoding (`token` next)."""

    request: Request
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # (token, piece, end), an error, or _END
    cancelled: bool = False
    spans: Iterator[Span] | None = None
    span: Span | None = None
    embeddings: dict[int, Any] = field(default_factory=dict)
    token: int | None = None  # sampled, to be stepped


@dataclass
class _Call:
    fn: Callable[[], Any]
    exclusive: bool
    future: Future = field(default_factory=Future)


class _Stream:
    """The caller's side of a job: iterates what the worker sends; `close()` cancels the job (also before the
    first item, which a generator's close would not see)."""

    def __init__(self, scheduler: Scheduler, job: _Job):
        self._scheduler, self._job, self._done = scheduler, job, False

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> tuple[int, bytes, bool]:
        if self._done:
            raise StopIteration
        item = self._job.out.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._scheduler._cancel(self._job)


class Scheduler:
    """Runs requests on `backend`'s sequences from a worker thread (module doc). `close()` stops it (running
    and waiting requests end with `SchedulerClosed`); the backend stays open."""

    def __init__(self, backend: BaseBackend):
        if not backend.multi_sequence:
            raise ValueError(f"{type(backend).__name__} holds one sequence: nothing to schedule")
        self.backend = backend
        self._free: list[SequenceState] = list(backend.sequences)  # least recently used first
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []  # in admission order
        self._calls: deque[_Call] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="r1v-scheduler", daemon=True)
        self._thread.start()

    @property
    def max_sequences(self) -> int:
        return len(self.backend.sequences)

    # --- callers' side (any thread) ---------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, exclusive: bool = False, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` on the worker between steps and return what it returns (or raise what it
        raised). `exclusive`: once no request runs (waiting requests are admitted after it)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        job = _Call(lambda: fn(*args, **kwargs), exclusive)
        with self._cond:
            if self._closed:
                raise SchedulerClosed(f"the model {self.backend.path.name} is closed")
            self._calls.append(job)
            self._cond.notify()
        return job.future.result()

    def submit(self, prompt: Prompt, params: SamplingParams) -> Run:
        """Queue a prepared prompt; the returned run yields (token, piece, end) as the worker samples them.
        Raises at once what the overflow check raises (`BaseBackend.request`)."""
        request = self.backend.request(prompt, params, self.backend.sequence)  # its sequence: at admission
        job = _Job(request)
        with self._cond:
            if self._closed:
                raise SchedulerClosed(f"the model {self.backend.path.name} is closed")
            self._waiting.append(job)
            self._cond.notify()
        return Run(_Stream(self, job), request.stats)

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def close(self) -> None:
        """Stop the worker after its current step; requests still waiting or running get `SchedulerClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._calls or self._active or (self._waiting and self._free)):
                    self._cond.wait()
                if self._closed:
                    break
                calls = self._runnable_calls()
                admitted = self._admissions() if not any(c.exclusive for c in self._calls) else []
                cancelled = [job for job in self._active if job.cancelled]
            for call in calls:
                self._run_call(call)
            for job in cancelled:
                self._leave(job, _END)
            for job, sequence in admitted:
                self._admit(job, sequence)
            if self._active:
                self._iterate()
        self._shut_down()

    def _runnable_calls(self) -> list[_Call]:
        """The calls to run now (under the lock): every one up to the first exclusive call, and that one too
        when no request is running."""
        calls = []
        while self._calls:
            call = self._calls[0]
            if call.exclusive and self._active:
                break
            calls.append(self._calls.popleft())
            if call.exclusive:
                break
        return calls

    def _admissions(self) -> list[tuple[_Job, SequenceState]]:
        """Waiting requests paired with free sequences, in arrival order (under the lock); cancelled ones end."""
        out = []
        while self._waiting and self._free:
            job = self._waiting.popleft()
            if job.cancelled:
                job.out.put(_END)
                continue
            sequence = self._pick(job.request.prompt.items)
            self._free.remove(sequence)
            out.append((job, sequence))
        return out

    def _pick(self, items: list[Any]) -> SequenceState:
        """The free sequence to put a prompt on: the one sharing the longest prefix with it when that covers at
        least half the prompt (a follow-up finds its conversation), else the least recently used one (so a new
        conversation that shares only the template's first tokens with a cached one does not evict it while
        another sequence is unused). llama-server picks its slot alike (--slot-prompt-similarity 0.5)."""
        best = max(self._free, key=lambda s: common_prefix(s.positions, items))  # ties: the least recent
        return best if 2 * common_prefix(best.positions, items) >= len(items) else self._free[0]

    @staticmethod
    def _run_call(call: _Call) -> None:
        try:
            call.future.set_result(call.fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            call.future.set_exception(e)

    def _admit(self, job: _Job, sequence: SequenceState) -> None:
        """Put the request on the sequence: keep or restore its prefix, encode its images, open its sampler."""
        job.request.sequence = sequence
        self._active.append(job)
        try:
            keep, job.embeddings = self.backend._begin(job.request)
            job.spans = self.backend.prompt_spans(job.request, keep)
            job.span = next(job.spans)
        except BaseException as e:  # noqa: BLE001 - the request's own failure (an image, a restore)
            self._leave(job, e)

    def _iterate(self) -> None:
        """One iteration: prompt spans within the budget, then one batched step of the decoding requests."""
        backend, budget = self.backend, self.backend.n_batch
        used = 0
        for job in [j for j in self._active if j.span is not None]:
            span = job.span
            n = span.end - span.start
            if used and used + n > budget:
                break
            used += n
            try:
                logits = backend._evaluate_prompt_span(job.request, span, job.embeddings)
                job.span = next(job.spans, None)
                if job.span is None:
                    self._sampled(job, logits)
            except BaseException as e:  # noqa: BLE001
                self._leave(job, e)
        decoding = [j for j in self._active if j.token is not None and not j.cancelled]
        if not decoding:
            return
        steps = [(job.request.sequence, job.token) for job in decoding]
        for job in decoding:
            job.token = None
        try:
            handles = backend._step_batch(steps)
        except BaseException as e:  # noqa: BLE001 - the batch failed: every request in it ends with the error
            for job in decoding:
                self._leave(job, e)
            return
        for job, handle in zip(decoding, handles):
            try:
                self._sampled(job, handle)
            except BaseException as e:  # noqa: BLE001
                self._leave(job, e)

    def _sampled(self, job: _Job, logits: Any) -> None:
        """Sample the request's next token from a handle of the last forward, hand it over; it ends there or
        steps next."""
        request = job.request
        token, piece, end = self.backend._sample(request, logits)
        job.out.put((token, piece, end))
        if end or request.produced == request.max_new:
            self._leave(job, _END)
        else:
            job.token = token

    def _leave(self, job: _Job, last: Any) -> None:
        """The request is over (ended, cancelled or failed): close its sampler, free its sequence (which keeps
        what it evaluated), and tell the caller `last` (_END or the error)."""
        self.backend._finish(job.request)
        if job in self._active:
            self._active.remove(job)
            with self._cond:
                self._free.append(job.request.sequence)
        job.token = job.span = None
        job.out.put(last)

    def _shut_down(self) -> None:
        error = SchedulerClosed(f"the model {self.backend.path.name} was closed")
        for job in list(self._active):
            self._leave(job, error)
        with self._cond:
            waiting, calls = list(self._waiting), list(self._calls)
            self._waiting.clear()
            self._calls.clear()
        for job in waiting:
            job.out.put(error)
        for call in calls:
            call.future.set_exception(error)
