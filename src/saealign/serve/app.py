"""HTTP API and web page for aligned generation (``saealign serve``; needs the ``serve`` extra).

::

    POST /v1/topics {texts}                        -> {id, top_latents: [{latent, score, g, prompts, examples}]}
    GET  /v1/topics/{id}                           -> the same
    POST /v1/generate {prompt | prompts, topic_id | topic_texts, method, mode, ..., stream}
                                                   -> {generations: [...]}, or Server-Sent Events
    POST /v1/completions, /v1/chat/completions     OpenAI-compatible, plus ``topic`` and ``saealign`` fields
    GET  /v1/examples, /v1/models, /health, /openapi.json, / (the page)

One process holds one :class:`Aligner`; :class:`~saealign.serve.batching.ModelWorker` batches the
concurrent requests onto its single model thread. Every mistake is a 4xx JSON ``{"error": message}``
(OpenAI routes: ``{"error": {"message", "type", "code"}}``) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from saealign.cache import hash_json
from saealign.errors import SaealignError
from saealign.reference.scoring import METRICS, SUMMARIES, TopicScores
from saealign.serve.batching import (
    BatchResult,
    GenerateJob,
    GenOptions,
    ModelWorker,
    StreamEnd,
    StreamFailed,
    StreamJob,
)
from saealign.steering.aligner import Aligner, TokenEvent
from saealign.steering.decoding import Sampling
from saealign.steering.edits import Steering

WEB_DIR = Path(__file__).parent / "web"
Method = Literal["none", "sae", "clamp", "swap", "weight"]
Mode = Literal["error", "replace"]


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for, and how the worker batches."""

    max_body_bytes: int = 1_000_000
    """Larger request bodies get 413."""
    max_topic_texts: int = 200
    """Texts per topic."""
    max_new_tokens: int = 256
    """Tokens one generation may ask for."""
    max_prompts: int = 16
    """Prompts per request."""
    max_batch_rows: int = 32
    """Rows of one :meth:`Aligner.generate` call (several requests together)."""
    max_streams: int = 4
    """Streams advanced together; more wait for a free slot."""
    max_topics: int = 256
    """Scored topics kept (least recently used dropped first)."""
    batch_window_s: float = 0.005
    """How long an idle worker waits for more requests before it starts a batch."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value >= (0 if name == "batch_window_s" else 1):
                raise SaealignError(f"ServerLimits.{name} must be positive, got {value}")


class ApiError(Exception):
    """A request the server refuses: answered as ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- request bodies ----------------------------------------------------------------------------------
class TopicRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(description="example texts of the topic (10-50 work well)")
    min_prompts: int = Field(20, ge=1, description="latents firing on fewer reference prompts are unscored")
    summary: Literal[SUMMARIES] = "normalized_sum"  # type: ignore[valid-type]
    metric: Literal[METRICS] = "euclidean"  # type: ignore[valid-type]
    top: int = Field(10, ge=1, le=100, description="latents shown")
    examples: int = Field(2, ge=0, le=10, description="reference texts shown per latent")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str | None = None
    prompts: list[str] | None = None
    topic_id: str | None = None
    topic_texts: list[str] | None = None
    method: Method | None = Field(None, description="default: swap with a topic, none without")
    mode: Mode = "error"
    strength: float | Literal["auto"] = Field("auto", description="Swap/Weight: scores**strength (1 = the paper); "
                                             "auto = strongest within +15 % perplexity, searched once per topic")
    max_new_tokens: int | None = Field(None, description="default: 64 or the server's limit if lower")
    top_k: int = 5
    temperature: float = 1.0
    seed: int | list[int] = 0
    greedy: bool = False
    chat: bool = False
    stream: bool = False


# -- shared state ------------------------------------------------------------------------------------
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

    def __init__(self, aligner: Aligner, limits: ServerLimits) -> None:
        self.aligner, self.limits = aligner, limits
        self.topics = TopicStore(aligner, limits)
        self.worker: ModelWorker | None = None

    @property
    def model_name(self) -> str:
        return self.aligner.lm.name

    async def topic(self, topic_id: str | None, texts: list[str] | None) -> tuple[str | None, TopicScores | None]:
        """The topic a request names by id or by texts (scored and kept), or ``(None, None)``."""
        if topic_id is not None and texts is not None:
            raise ApiError(400, "give the topic by id or by texts, not both")
        if topic_id is not None:
            return topic_id, self.topics.get(topic_id)
        if texts is not None:
            return await self.topics.create(texts)
        return None, None

    def options(self, topic: TopicScores | None, method: str | None, mode: str, strength: float | str,
                max_new_tokens: int | None, top_k: int, temperature: float, greedy: bool, chat: bool) -> GenOptions:
        """Checked generation options (400 with the library's message when one is wrong)."""
        method = method or ("swap" if topic is not None else "none")
        if max_new_tokens is None:
            max_new_tokens = min(64, self.limits.max_new_tokens)
        if max_new_tokens > self.limits.max_new_tokens:
            raise ApiError(400, f"max_new_tokens is {max_new_tokens}, more than this server's limit of "
                                f"{self.limits.max_new_tokens}: ask for fewer")
        if method in ("clamp", "swap", "weight") and topic is None:
            raise ApiError(400, f"method {method!r} needs a topic: give a topic id or topic texts, or method 'none'")
        number = 1.0 if strength == "auto" else float(strength)
        options = GenOptions(method, mode, "auto" if strength == "auto" else number, max_new_tokens, top_k,
                             float(temperature), greedy, chat)
        Sampling(max_new_tokens, top_k, temperature, greedy)  # raise SaealignError now, not inside a batch
        Steering(method, mode, strength=number)
        return options

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
                       options: GenOptions) -> BatchResult:
        assert self.worker is not None
        return await self.worker.generate(GenerateJob(prompts, seeds, topic, topic_id, options))

    async def open_stream(self, prompt: str, seed: int, topic: TopicScores | None, options: GenOptions) -> StreamJob:
        assert self.worker is not None
        job = StreamJob(prompt, seed, topic, options)
        await self.worker.open_stream(job)
        return job

    async def events(self, request: Request, job: StreamJob) -> AsyncIterator[TokenEvent | StreamEnd | StreamFailed]:
        """The stream's items until its end; stops (and frees the slot) when the client disconnects."""
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


# -- the app -----------------------------------------------------------------------------------------
def create_app(aligner: Aligner, limits: ServerLimits | None = None) -> FastAPI:
    """The ASGI app serving ``aligner`` (start it with :func:`serve`, or any ASGI server, one worker)."""
    from saealign.serve import routes as server_routes

    limits = limits or ServerLimits()
    state = ServerState(aligner, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.worker = ModelWorker(aligner, limits.max_batch_rows, limits.max_streams, limits.batch_window_s)
        state.worker.start()
        try:
            yield
        finally:
            await state.worker.stop()
            state.topics.executor.shutdown(wait=False)

    app = FastAPI(title="saealign", summary="Topic-aligned generation by editing SAE latents", lifespan=lifespan)
    app.state.saealign = state
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    _error_handlers(app)
    server_routes.add_routes(app, state)
    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html")

    return app


def serve(aligner: Aligner, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          log_level: str = "info") -> None:
    """Serve ``aligner`` until interrupted (one process: it holds the model)."""
    import uvicorn

    uvicorn.run(create_app(aligner, limits), host=host, port=port, log_level=log_level)


def _is_openai(request: Request) -> bool:
    return request.url.path.rstrip("/").endswith(("/completions", "/models"))


def error_response(request: Request, status: int, message: str) -> JSONResponse:
    """``{"error": message}``; OpenAI's ``{"error": {"message", "type", "code"}}`` on its routes."""
    if _is_openai(request):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)
    return JSONResponse({"error": message}, status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return f"malformed JSON at character {loc[0] if loc else '?'} ({detail}): send a JSON object"
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, str(exc))

    @app.exception_handler(SaealignError)
    async def library_error(request: Request, exc: SaealignError) -> JSONResponse:
        return error_response(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        return error_response(request, 400 if malformed else 422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")


class BodyLimit:
    """Refuse bodies over ``max_bytes`` (413) and bodies that are not UTF-8 (400) before any route.

    An oversized body is still read (up to 16x the limit) and dropped, so the client, which sends the
    whole body before it reads the answer, gets the 413 instead of a reset connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body, size, more = bytearray(), 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:
                body += chunk
            elif size > 16 * self.max_bytes:
                break
            more = message.get("more_body", False)
        if size > self.max_bytes:
            await self._refuse(scope, send, 413, f"the request body is {'over ' if more else ''}{size} bytes, more "
                                                 f"than this server's limit of {self.max_bytes}: send less")
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            await self._refuse(scope, send, 400, f"the request body is not UTF-8 (byte {e.start}): send JSON "
                                                 "encoded as UTF-8")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for the disconnect, as before
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, status: int, message: str) -> None:
        request = Request(scope)
        await error_response(request, status, message)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
