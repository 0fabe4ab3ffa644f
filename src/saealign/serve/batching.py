"""The server's one model worker: batches concurrent generate requests, interleaves streams.

The model is not thread-safe (the steering hook is attached to one block around each forward
call), so every model call runs on one thread, in the order this worker decides:

- **generate requests** wait in a queue. Each round takes the oldest request and every queued
  request compatible with it (the same :class:`~saealign.steering.spec.GenerationSpec`; each row
  may have its own topic and seed) into ONE :meth:`Aligner.generate` call, up to
  ``max_batch_rows`` rows. Requests that arrive while a batch runs form the next one.
- **streams** (one prompt each, :meth:`Aligner.stream`) hold one of ``max_streams`` slots and
  advance one token per round, in turn (the last item is the stream's :class:`Generation`), so two streams (the page's unsteered and steered
  outputs) grow side by side. A stream whose client reads slowly is skipped until its buffer
  drains; a cancelled stream (its client went away) is closed and frees its slot.

Everything but the model calls runs on the event loop, so the worker's state needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from saealign.errors import SaealignError
from saealign.reference.scoring import TopicScores
from saealign.steering.aligner import Aligner, Generation, TokenEvent
from saealign.steering.spec import GenerationSpec


@dataclass
class GenerateJob:
    """One generate request: its prompts, one seed per prompt, and its topic (or None)."""

    prompts: list[str]
    seeds: list[int]
    topic: TopicScores | None
    topic_id: str | None
    spec: GenerationSpec
    """Shared by every row of a batch (``auto`` strength is resolved per topic, so rows may differ)."""
    row_tokens: int = 0
    """Token slots each row needs (longest prompt + max_new_tokens; 0 = not counted): bounds a batch's size."""
    future: asyncio.Future[BatchResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def key(self) -> tuple[GenerationSpec, bool]:
        # rows with and without a topic cannot share a call: topic_per_row needs a topic for every row
        return self.spec, self.topic is not None


@dataclass(frozen=True)
class BatchResult:
    """A job's generations, in prompt order, and the batch they were made in."""

    generations: list[Generation]
    batch: int
    """1-based number of the :meth:`Aligner.generate` call (equal for jobs served together)."""
    batch_rows: int


@dataclass(frozen=True)
class StreamFailed:
    """A stream stopped by an error after it started."""

    message: str


@dataclass
class StreamJob:
    """One streamed prompt. ``events`` receives TokenEvents, then its Generation (or a StreamFailed)."""

    prompt: str
    seed: int
    topic: TopicScores | None
    spec: GenerationSpec
    events: asyncio.Queue[TokenEvent | Generation | StreamFailed] = field(default_factory=asyncio.Queue)
    started: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Resolved once the stream exists (or with the error that prevented it: bad options)."""
    cancelled: bool = False
    produced: int = 0
    generator: Iterator[TokenEvent | Generation] | None = None


@dataclass
class WorkerStats:
    batches: int = 0
    rows: int = 0
    streams_done: int = 0
    streams_cancelled: int = 0


class ModelWorker:
    """Owns the :class:`Aligner`; every model call goes through its single thread."""

    def __init__(self, aligner: Aligner, max_batch_rows: int = 32, max_streams: int = 4,
                 batch_window_s: float = 0.0, stream_buffer: int = 16, max_batch_tokens: int | None = None) -> None:
        self.aligner = aligner
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        """Token slots of one call (rows x widest row; padded rows all grow to it): bounds its memory."""
        self.max_streams = max_streams
        self.batch_window_s = batch_window_s
        self.stream_buffer = stream_buffer
        self.stats = WorkerStats()
        self.pending: deque[GenerateJob] = deque()
        self.waiting: deque[StreamJob] = deque()
        self.active: list[StreamJob] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saealign-model")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the API the routes use ----------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="saealign-model-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self.active:
            if job.generator is not None:
                await self._call(job.generator.close)  # type: ignore[attr-defined]
        self._executor.shutdown(wait=True)

    async def generate(self, job: GenerateJob) -> BatchResult:
        self.pending.append(job)
        self._wake.set()
        return await job.future

    async def open_stream(self, job: StreamJob) -> None:
        """Queue ``job`` and return once it streams; raises what :meth:`Aligner.stream` raised."""
        self.waiting.append(job)
        self._wake.set()
        try:
            await job.started
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    def cancel(self, job: StreamJob) -> None:
        """Stop ``job`` (its client went away); the worker closes it on its next round."""
        job.cancelled = True
        self._wake.set()

    def consumed(self) -> None:
        """A stream's reader took an item: its buffer may have room again."""
        self._wake.set()

    def snapshot(self) -> dict[str, int]:
        return asdict(self.stats) | {"queued": sum(len(j.prompts) for j in self.pending),
                                     "streams_active": len(self.active), "streams_waiting": len(self.waiting)}

    # -- the loop ------------------------------------------------------------------------------
    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _loop(self) -> None:
        while True:
            if await self._round():
                continue
            idle = not (self.pending or self.waiting or self.active)
            self._wake.clear()  # no await since the round ended, so no wake-up was lost
            await self._wake.wait()
            if idle and self.batch_window_s > 0:
                await asyncio.sleep(self.batch_window_s)  # let requests sent together arrive together

    async def _round(self) -> bool:
        """One batch, then one token of each stream with room; whether anything happened."""
        progressed = await self._admit_streams()
        if self.pending:
            await self._run_batch(self._take_batch())
            progressed = True
        for job in list(self.active):
            if job.cancelled:
                await self._close(job, cancelled=True)
                progressed = True
            elif job.events.qsize() < self.stream_buffer:
                await self._advance(job)
                progressed = True
        return progressed

    def _take_batch(self) -> list[GenerateJob]:
        key = self.pending[0].key
        chosen: list[GenerateJob] = []
        rest: deque[GenerateJob] = deque()
        rows = width = 0
        for job in self.pending:
            fits = rows + len(job.prompts) <= self.max_batch_rows and (
                self.max_batch_tokens is None
                or (rows + len(job.prompts)) * max(width, job.row_tokens) <= self.max_batch_tokens)
            if job.key == key and (not chosen or fits):
                chosen.append(job)
                rows += len(job.prompts)
                width = max(width, job.row_tokens)
            else:
                rest.append(job)
        self.pending = rest
        return chosen

    async def _run_batch(self, jobs: list[GenerateJob]) -> None:
        try:
            generations = await self._call(self._generate, jobs)
        except SaealignError as e:
            if len(jobs) == 1:
                _fail(jobs[0].future, e)
                return
            for job in jobs:  # one bad request (a prompt too long) must not fail the others
                await self._run_batch([job])
            return
        except Exception as e:  # a bug: report it to the waiting clients, keep serving
            for job in jobs:
                _fail(job.future, e)
            return
        self.stats.batches += 1
        self.stats.rows += len(generations)
        start = 0
        for job in jobs:
            n = len(job.prompts)
            if not job.future.done():
                job.future.set_result(BatchResult(generations[start : start + n], self.stats.batches,
                                                  len(generations)))
            start += n

    def _generate(self, jobs: list[GenerateJob]) -> list[Generation]:
        """Runs on the model thread: one :meth:`Aligner.generate` call for every row of ``jobs``."""
        prompts = [p for job in jobs for p in job.prompts]
        seeds = [s for job in jobs for s in job.seeds]
        topics: list[TopicScores] = []
        slot: dict[str, int] = {}
        per_row: list[int] = []
        for job in jobs:
            if job.topic is not None:
                i = slot.setdefault(job.topic_id or str(id(job.topic)), len(topics))
                if i == len(topics):
                    topics.append(job.topic)
                per_row += [i] * len(job.prompts)
        return self.aligner.generate(prompts, topics or None, jobs[0].spec, seed=seeds,
                                     topic_per_row=per_row if topics else None)

    async def _admit_streams(self) -> bool:
        admitted = False
        while self.waiting and len(self.active) < self.max_streams:
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            try:
                job.generator = await self._call(self.aligner.stream, job.prompt, job.topic, job.spec, job.seed)
            except Exception as e:  # bad options: the route answers 4xx before any event is sent
                _fail(job.started, e)
                continue
            self.active.append(job)
            if not job.started.done():
                job.started.set_result(None)
            admitted = True
        return admitted

    async def _advance(self, job: StreamJob) -> None:
        assert job.generator is not None
        try:
            event = await self._call(next, job.generator, None)
        except Exception as e:
            job.events.put_nowait(StreamFailed(str(e) if isinstance(e, SaealignError) else f"internal error: {e!r}"))
            await self._close(job, cancelled=False)
            return
        if event is None:  # a stream ends with its Generation: reaching the end without one is a bug
            job.events.put_nowait(StreamFailed("internal error: the stream ended without its generation"))
            await self._close(job, cancelled=False)
            return
        job.events.put_nowait(event)
        if isinstance(event, Generation):
            await self._close(job, cancelled=False)
            return
        job.produced += 1

    async def _close(self, job: StreamJob, cancelled: bool) -> None:
        self.active.remove(job)
        if job.generator is not None:
            await self._call(job.generator.close)  # type: ignore[attr-defined]
        if cancelled:
            self.stats.streams_cancelled += 1
        else:
            self.stats.streams_done += 1


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
