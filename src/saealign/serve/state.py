"""What the routes share: the aligner, the limits, the scored topics and the model worker.

:class:`ServerState` turns a request's fields into library values, checked before any work: the
topic (by id or by texts, :meth:`ServerState.topic`), the prompts and seeds, and one
:class:`~saealign.steering.spec.GenerationSpec` (:meth:`ServerState.spec`), whose own checks answer 400.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request

from saealign.cache import hash_json
from saealign.reference.scoring import TopicScores
from saealign.serve.batching import BatchResult, GenerateJob, ModelWorker, StreamFailed, StreamJob
from saealign.serve.limits import ServerGuard, TokenBudget
from saealign.serve.schemas import ApiError, ServerLimits
from saealign.serve.searches import StrengthSearches
from saealign.steering.aligner import Aligner, Generation, TokenEvent
from saealign.steering.spec import DEFAULT_METHOD, GenerationSpec


class TopicStore:
    """Scored topics by id (a hash of texts and scoring options), least recently used dropped first."""

    def __init__(self, aligner: Aligner, limits: ServerLimits) -> None:
        self.aligner, self.limits = aligner, limits
        self.topics: OrderedDict[str, TopicScores] = OrderedDict()
        # the embedder and index live off the model thread: a topic never waits behind a generation
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saealign-topics")

    async def create(self, texts: list[str], summary: str = "normalized_sum", metric: str = "euclidean",
                     min_prompts: int = 20) -> tuple[str, TopicScores]:
        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            raise ApiError(400, "the topic has no texts: give at least one non-empty example text")
        if len(texts) > self.limits.max_topic_texts:
            raise ApiError(413, f"{len(texts)} topic texts, more than this server's limit of "
                                f"{self.limits.max_topic_texts}: send fewer")
        topic_id = hash_json([texts, summary, metric, min_prompts])[:12]
        if topic_id not in self.topics:
            self.topics[topic_id] = await self.run(self.aligner.topic, texts, summary, metric, min_prompts)
            while len(self.topics) > self.limits.max_topics:
                self.topics.popitem(last=False)
        self.topics.move_to_end(topic_id)
        return topic_id, self.topics[topic_id]

    def get(self, topic_id: str) -> TopicScores:
        if topic_id not in self.topics:
            raise ApiError(404, f"unknown topic id {topic_id!r}: create it with POST /v1/topics (ids are "
                                "forgotten when the server restarts)")
        self.topics.move_to_end(topic_id)
        return self.topics[topic_id]

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def view(self, topic_id: str, scores: TopicScores, top: int = 10, examples: int = 2) -> dict[str, Any]:
        index = self.aligner.index
        rows = [{"latent": i, "score": _num(scores.scores[i]), "g": _num(scores.g[i]),
                 "prompts": int(scores.n_prompts[i]),
                 "examples": [t for t, _ in await self.run(index.top_texts, i, examples)] if index else []}
                for i in scores.top(top)]  # fmt: skip
        # strengths chosen by "auto" so far (searched on the first generation that asks for one)
        auto = [{"method": c["method"], "mode": c["mode"], "strength": c["strength"], "ppl_ratio": c["ppl_ratio"],
                 "distance": c["distance"], "base_distance": c["base_distance"], "seconds": c["seconds"]}
                for c in scores.extra.get("auto_strength", {}).values()]
        return {"id": topic_id, "texts": len(scores.topic_texts), "scored": int(scores.scored.sum()),
                "note": scores.note, "top_latents": rows, "auto_strength": auto}


class ServerState:
    """What the routes share: the aligner, the limits, the topics and the model worker."""

    def __init__(self, aligner: Aligner, limits: ServerLimits, guard: ServerGuard | None = None) -> None:
        self.aligner, self.limits, self.guard = aligner, limits, guard or ServerGuard()
        self.searches = StrengthSearches(aligner, self.guard)  # before the topics: it locks the shared embedder
        self.budget = TokenBudget(aligner.lm, self.guard.max_request_tokens)
        self.topics = TopicStore(aligner, limits)
        self.worker: ModelWorker | None = None

    @property
    def model_name(self) -> str:
        return self.aligner.lm.name

    async def topic(self, topic: str | list[str] | None) -> tuple[str | None, TopicScores | None]:
        """The topic a request names, by id (a string) or by texts (a list: scored and kept), or ``(None, None)``."""
        if topic is None:
            return None, None
        if isinstance(topic, str):
            return topic, self.topics.get(topic)
        return await self.topics.create(topic)

    def spec(self, topic: TopicScores | None, method: str | None, max_new_tokens: int | None,
             fields: dict[str, Any]) -> GenerationSpec:
        """The request's generation spec (400 with the library's message when a field is wrong)."""
        method = method or (DEFAULT_METHOD if topic is not None else "none")
        if max_new_tokens is None:
            max_new_tokens = min(64, self.limits.max_new_tokens)
        if max_new_tokens > self.limits.max_new_tokens:
            raise ApiError(400, f"max_new_tokens is {max_new_tokens}, more than this server's limit of "
                                f"{self.limits.max_new_tokens}: ask for fewer")
        spec = GenerationSpec(method=method, max_new_tokens=max_new_tokens, **fields)
        if (spec.tune_steps or 0) > self.limits.max_tune_steps:
            raise ApiError(400, f"tune_steps is {spec.tune_steps}, more than this server's limit of "
                                f"{self.limits.max_tune_steps}: ask for fewer")
        if spec.needs_topic and topic is None:
            raise ApiError(400, f"method {method!r} needs a topic: give a topic id or topic texts, or method 'none'")
        return spec

    def prompts(self, prompt: str | None, prompts: list[str] | None) -> list[str]:
        if (prompt is None) == (prompts is None):
            raise ApiError(400, "give exactly one of prompt (a string) or prompts (a list of strings)")
        out = [prompt] if prompt is not None else list(prompts or [])
        if not out:
            raise ApiError(400, "prompts is empty: give at least one prompt")
        if len(out) > self.limits.max_prompts:
            raise ApiError(413, f"{len(out)} prompts, more than this server's limit of {self.limits.max_prompts}: "
                                "send fewer per request")
        for i, p in enumerate(out):
            if not p.strip():
                raise ApiError(400, f"prompt {i} is empty: give some text to continue")
        return out

    def seeds(self, seed: int | list[int] | None, n: int) -> list[int]:
        if seed is None:
            return [0] * n
        if isinstance(seed, int):
            return [seed] * n
        if len(seed) != n:
            raise ApiError(400, f"{len(seed)} seeds for {n} prompts: give one seed, or one per prompt")
        return list(seed)

    async def generate(self, prompts: list[str], seeds: list[int], topic_id: str | None, topic: TopicScores | None,
                       spec: GenerationSpec) -> BatchResult:
        assert self.worker is not None
        cost = self.budget.check(prompts, spec)  # over the budget: 413 before any work
        spec = await self.searches.resolve(topic, spec)  # the worker never runs a strength search
        return await self.worker.generate(GenerateJob(prompts, seeds, topic, topic_id, spec,
                                                      row_tokens=cost // len(prompts)))

    async def open_stream(self, prompt: str, seed: int, topic: TopicScores | None, spec: GenerationSpec) -> StreamJob:
        assert self.worker is not None
        self.budget.check([prompt], spec)
        spec = await self.searches.resolve(topic, spec)
        job = StreamJob(prompt, seed, topic, spec)
        await self.worker.open_stream(job)
        return job

    async def events(self, request: Request, job: StreamJob) -> AsyncIterator[TokenEvent | Generation | StreamFailed]:
        """The stream's items until its :class:`Generation` (or failure); stops, freeing the slot, when the client
        disconnects."""
        assert self.worker is not None
        ended = False
        try:
            while True:
                item = await job.events.get()
                self.worker.consumed()
                if isinstance(item, TokenEvent) and await request.is_disconnected():
                    return
                ended = not isinstance(item, TokenEvent)
                yield item
                if ended:
                    return
        finally:  # also reached when the response is cancelled because the client went away
            if not ended:
                self.worker.cancel(job)


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
