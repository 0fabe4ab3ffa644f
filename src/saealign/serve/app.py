"""HTTP API and web page for aligned generation (``saealign serve``; needs the ``serve`` extra).

::

    POST /v1/topics {texts}                        -> {id, top_latents: [{latent, score, g, prompts, examples}]}
    GET  /v1/topics/{id}                           -> the same
    POST /v1/generate {prompt | prompts, topic, method, mode, strength, ..., stream}
                                                   -> {generations: [...]}, or Server-Sent Events
    POST /v1/completions, /v1/chat/completions     OpenAI-compatible, plus ``topic`` and ``saealign`` fields
    GET  /v1/examples, /v1/models, /health, /openapi.json, / (the page)

``topic`` is a topic id or a list of topic texts in every route (``/v1/generate`` also takes the
aliases ``topic_id`` / ``topic_texts``). One process holds one :class:`Aligner`;
:class:`~saealign.serve.batching.ModelWorker` batches the concurrent requests onto its single model
thread. Every mistake is a 4xx JSON ``{"error": message}`` (OpenAI routes: ``{"error": {"message",
"type", "code"}}``) and the server keeps serving. The modules: :mod:`~saealign.serve.schemas`
(requests, limits), :mod:`~saealign.serve.state` (topics, specs), :mod:`~saealign.serve.routes`,
:mod:`~saealign.serve.batching` (the worker), :mod:`~saealign.serve.http` (errors, body limit),
:mod:`~saealign.serve.security` (API key, rate limit), :mod:`~saealign.serve.limits` (the guard, token
budgets), :mod:`~saealign.serve.searches` (strength searches off the model thread).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from saealign.serve.batching import ModelWorker
from saealign.serve.http import BodyLimit, error_handlers
from saealign.serve.limits import ServerGuard
from saealign.serve.routes import add_routes
from saealign.serve.schemas import ServerLimits
from saealign.serve.security import ApiKeyGate, RateLimit
from saealign.serve.state import ServerState
from saealign.steering.aligner import Aligner

WEB_DIR = Path(__file__).parent / "web"
__all__ = ["ServerGuard", "ServerLimits", "create_app", "serve"]


def create_app(aligner: Aligner, limits: ServerLimits | None = None, guard: ServerGuard | None = None) -> FastAPI:
    """The ASGI app serving ``aligner`` (start it with :func:`serve`, or any ASGI server, one worker).

    ``guard``: the API key, rate limit, token budgets and strength-search policy (:class:`ServerGuard`'s defaults
    when None; see :mod:`saealign.serve.limits`).
    """
    limits = limits or ServerLimits()
    guard = guard or ServerGuard()
    state = ServerState(aligner, limits, guard)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.worker = ModelWorker(aligner, limits.max_batch_rows, limits.max_streams, limits.batch_window_s,
                                   max_batch_tokens=guard.max_batch_tokens)
        state.worker.start()
        try:
            yield
        finally:
            await state.worker.stop()
            state.topics.executor.shutdown(wait=False)
            state.searches.shutdown()

    app = FastAPI(title="saealign", summary="Topic-aligned generation by editing SAE latents", lifespan=lifespan)
    app.state.saealign = state
    # the last added runs first: the rate limit, then the key, then the body limit
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if guard.api_key is not None:
        app.add_middleware(ApiKeyGate, api_key=guard.api_key)
    if guard.rate_per_minute > 0:
        app.add_middleware(RateLimit, per_minute=guard.rate_per_minute, burst=guard.rate_burst)
    error_handlers(app)
    add_routes(app, state)
    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html")

    return app


def serve(aligner: Aligner, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          log_level: str = "info", guard: ServerGuard | None = None) -> None:
    """Serve ``aligner`` until interrupted (one process: it holds the model)."""
    import uvicorn

    uvicorn.run(create_app(aligner, limits, guard), host=host, port=port, log_level=log_level)
