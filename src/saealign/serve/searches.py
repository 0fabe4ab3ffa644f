"""``strength=auto`` searches off the generation thread, so a new topic never stalls the other clients.

The search generates with the model (candidates x neutral prompts) and the model is not thread-safe
(the steering hook sits on one block during each call). So searches run on their own thread with
their own copy of the model and tokenizer (made on the first search: a server that never searches
pays nothing), and the embedder is shared under a lock with topic scoring. The choice lands in the
topic's ``extra["auto_strength"]``, where the model worker's :class:`Aligner` finds it; requests
reach the worker with a number, so the worker itself never searches.

While a topic's search runs, a request for it waits (``wait``, the default) or is served at once at
:func:`~saealign.serve.limits.fallback_spec` (``fallback``; its answer reports the strength used).
Requests for known topics, and for numeric strengths, never wait for a search.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from saealign.reference.scoring import TopicScores
from saealign.serve.limits import ServerGuard, fallback_spec
from saealign.serve.schemas import ApiError
from saealign.steering.aligner import Aligner
from saealign.steering.spec import STRENGTH_METHODS, GenerationSpec
from saealign.steering.strength import StrengthChoice, cache_key


class LockedEmbedder:
    """An embedder whose ``embed`` calls take a lock: topic scoring and searches share one embedder
    (and its tokenizer, which two threads must not use at once)."""

    def __init__(self, inner: Any, lock: threading.Lock) -> None:
        self.inner, self.lock = inner, lock

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return self.inner.embed(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class StrengthSearches:
    """Runs the server's strength searches on their own thread; :meth:`resolve` makes a request's ``auto``
    servable by the model worker without a search."""

    def __init__(self, aligner: Aligner, guard: ServerGuard) -> None:
        self.aligner, self.guard = aligner, guard
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saealign-search")
        self.running: dict[tuple[int, str], asyncio.Future[StrengthChoice]] = {}
        self._searcher: Aligner | None = None
        if aligner.embedder is not None and not isinstance(aligner.embedder, LockedEmbedder):
            aligner.embedder = LockedEmbedder(aligner.embedder, threading.Lock())  # type: ignore[assignment]

    def searcher(self) -> Aligner:
        """The search's own Aligner: copies of the model and tokenizer; SAEs (the companions' too), index and
        embedder shared."""
        if self._searcher is None:
            lm = self.aligner.lm
            own = dataclasses.replace(lm, model=copy.deepcopy(lm.model), tokenizer=copy.deepcopy(lm.tokenizer))
            self._searcher = Aligner(own, self.aligner.sae, self.aligner.layer, self.aligner.index,
                                     self.aligner.embedder, self.aligner.companion_spec)
            self._searcher.auto_config = self.aligner.auto_config
        return self._searcher

    def _key(self, spec: GenerationSpec) -> str:
        """Where the search of ``spec`` caches its choice (the spec resolved as the worker's Aligner resolves it)."""
        return cache_key(self.aligner, self.aligner.resolve(spec), self.aligner.auto_config)

    def known(self, topic: TopicScores, spec: GenerationSpec) -> StrengthChoice | None:
        found = topic.extra.get("auto_strength", {}).get(self._key(spec))
        return StrengthChoice.from_json(found) if found is not None else None

    async def resolve(self, topic: TopicScores | None, spec: GenerationSpec) -> GenerationSpec:
        """``spec`` once the worker can serve it without searching: ``auto`` kept when the topic's choice is known
        (after waiting for its search, under ``wait``), the fallback number while it runs (``fallback``). Specs
        without ``auto`` or without a strength pass through."""
        if topic is None or not spec.is_auto or spec.method not in STRENGTH_METHODS:
            return spec
        if self.guard.auto_strength == "off":
            raise ApiError(400, "this server does not search strengths (auto_strength off): give a number as strength")
        topic.check_compatible(self.aligner.sae_key, self.aligner.sae.d_sae)
        if self.known(topic, spec) is not None:
            return spec  # the worker's Aligner finds the choice on the topic: auto rows still batch together
        future = self._start(topic, spec)
        if self.guard.auto_strength == "fallback":
            return fallback_spec(spec)
        await asyncio.shield(future)  # a client that goes away does not cancel the search: its result is kept
        return spec

    def _start(self, topic: TopicScores, spec: GenerationSpec) -> asyncio.Future[StrengthChoice]:
        key = (id(topic), self._key(spec))
        if key in self.running:
            return self.running[key]
        if len(self.running) >= self.guard.max_searches:
            raise ApiError(429, f"{len(self.running)} strength searches are running or queued, this server's limit: "
                                "give a number as strength, or retry when they are done")
        loop = asyncio.get_running_loop()
        future = asyncio.ensure_future(loop.run_in_executor(self.executor, self._search, topic, spec))
        self.running[key] = future

        def done(f: asyncio.Future[StrengthChoice]) -> None:
            self.running.pop(key, None)
            if not f.cancelled():
                f.exception()  # retrieved: a failed search nobody waited for (fallback) is not logged as lost

        future.add_done_callback(done)
        return future

    def _search(self, topic: TopicScores, spec: GenerationSpec) -> StrengthChoice:
        return self.searcher().auto_strength(topic, spec)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
