"""The routes of :func:`saealign.serve.app.create_app`: saealign's own API and the OpenAI-compatible one.

OpenAI compatibility: ``/v1/completions`` and ``/v1/chat/completions`` accept OpenAI's request
fields and answer in OpenAI's schema (streams as ``chat.completion.chunk`` / ``text_completion``
events ending with ``data: [DONE]``), so existing clients work unchanged. Two extra fields choose
the alignment: ``topic`` (a topic id from ``POST /v1/topics``, or a list of topic texts, as in every
route) and ``saealign`` (the steering fields of :class:`~saealign.serve.schemas.SteeringOptions`).
``temperature`` 0 means greedy; ``top_p`` and other sampling fields are ignored (saealign samples
top-k, the paper's k = 5); ``stop`` and ``n`` > 1 are refused. Chat is single-turn: system messages
are prepended to the one user message.

A stream's last event carries the :class:`~saealign.steering.aligner.Generation` the library
produced (text, finish reason, contamination, strength used): nothing is re-derived here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse

from saealign.jsonio import standard
from saealign.serve.batching import StreamJob
from saealign.serve.schemas import (
    ApiError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    OpenAIRequest,
    TopicRequest,
)
from saealign.serve.state import ServerState
from saealign.steering.aligner import Generation, TokenEvent
from saealign.steering.spec import DEFAULT_METHOD, METHODS, MODES

FINISH = {"eos": "stop", "length": "length"}


def add_routes(app: FastAPI, state: ServerState) -> None:
    """Register every API route of ``state`` on ``app``."""
    aligner = state.aligner

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        """Liveness, what is loaded, the worker's counters (``batches``: generate calls run), the steering methods."""
        worker = state.worker.snapshot() if state.worker else {}
        return {"status": "ok", "model": state.model_name, "layer": aligner.layer, "sae": aligner.sae_key,
                "d_sae": aligner.sae.d_sae, "index": aligner.index is not None, "topics": len(state.topics.topics),
                **worker, "limits": asdict(state.limits) | state.guard.public(), "searches": len(state.searches.running),
                "methods": list(METHODS), "modes": list(MODES), "default_method": DEFAULT_METHOD}

    @app.get("/v1/examples", tags=["topics"])
    async def examples() -> dict[str, Any]:
        """The example topics shipped with saealign (``data/topics/*.txt``)."""
        from saealign.defaults import TOPICS_DIR

        files = sorted(TOPICS_DIR.glob("*.txt"))
        return {"examples": [{"name": f.stem, "texts": [t for t in f.read_text("utf-8").splitlines() if t.strip()]}
                             for f in files]}

    @app.post("/v1/topics", tags=["topics"])
    async def create_topic(body: TopicRequest) -> dict[str, Any]:
        """Score every latent against the topic texts (M1); the answer's ``id`` names the topic later."""
        topic_id, scores = await state.topics.create(body.texts, body.summary, body.metric, body.min_prompts)
        return await state.topics.view(topic_id, scores, body.top, body.examples)

    @app.get("/v1/topics/{topic_id}", tags=["topics"])
    async def get_topic(topic_id: str, top: int = Query(10, ge=1, le=100),
                        examples: int = Query(2, ge=0, le=10)) -> dict[str, Any]:
        """A topic scored earlier (404 when unknown, e.g. after a restart)."""
        return await state.topics.view(topic_id, state.topics.get(topic_id), top, examples)

    @app.post("/v1/generate", tags=["generate"])
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Continue the prompt(s) steered toward the topic; Server-Sent Events when ``stream`` is true.

        ``topic``: a topic id or the topic's texts (``topic_id`` / ``topic_texts`` are aliases).
        Stream events: ``data: {text, token_id, contamination, index}`` per token, then
        ``event: done`` with the whole generation, as the non-streamed answer gives it (or ``event: error``).
        """
        prompts = state.prompts(body.prompt, body.prompts)
        seeds = state.seeds(body.seed, len(prompts))
        topic_id, topic = await state.topic(body.topic_value())
        spec = state.spec(topic, body.method, body.max_new_tokens, body.spec_fields())
        if body.stream:
            if len(prompts) != 1:
                raise ApiError(400, "a stream has one prompt: send prompt, not a list of prompts")
            job = await state.open_stream(prompts[0], seeds[0], topic, spec)
            return sse_response(_generate_events(state, request, job, topic_id))
        result = await state.generate(prompts, seeds, topic_id, topic, spec)
        return {"model": state.model_name, "batch": result.batch, "batch_rows": result.batch_rows,
                "generations": [_generation(g, topic_id) for g in result.generations]}

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        """OpenAI-compatible: the one model this server holds."""
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "saealign"}]}

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """OpenAI-compatible text completion, aligned to ``topic`` with the ``saealign`` options."""
        prompts = state.prompts(body.prompt, None) if isinstance(body.prompt, str) else state.prompts(None, body.prompt)
        return await _openai(state, request, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """OpenAI-compatible chat completion (single turn), aligned to ``topic`` with the ``saealign`` options."""
        prompt = state.prompts(_chat_prompt(body.messages), None)
        return await _openai(state, request, body, prompt, body.max_completion_tokens or body.max_tokens, chat=True)


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event; ``data`` is JSON-encoded unless it is already a string."""
    body = data if isinstance(data, str) else standard(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _generation(g: Generation, topic_id: str | None) -> dict[str, Any]:
    out = g.to_json()
    del out["topic_index"]  # rows of one request share its topic: name it by id
    return out | {"topic_id": topic_id}


async def _generate_events(state: ServerState, request: Request, job: StreamJob,
                           topic_id: str | None) -> AsyncIterator[str]:
    async for item in state.events(request, job):
        if isinstance(item, TokenEvent):
            yield sse({"text": item.text, "token_id": item.token_id, "contamination": item.contamination,
                       "index": item.index})
        elif isinstance(item, Generation):
            yield sse(_generation(item, topic_id), event="done")
        else:
            yield sse({"error": item.message}, event="error")


def _chat_prompt(messages: list[ChatMessage]) -> str:
    """The one user message, after any system messages (the Aligner's chat template takes one turn)."""

    def text(m: ChatMessage) -> str:
        if isinstance(m.content, str):
            return m.content
        parts = m.content or []
        if any(p.get("type") != "text" for p in parts):
            raise ApiError(400, f"a {m.role} message has non-text content: saealign takes text only")
        return "".join(str(p.get("text", "")) for p in parts)

    system = [text(m) for m in messages if m.role in ("system", "developer")]
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if len(turns) != 1 or turns[0].role != "user":
        raise ApiError(400, f"saealign answers one user message (after optional system messages), got roles "
                            f"{[m.role for m in messages]}: send the conversation as one user message")
    return "\n\n".join([*system, text(turns[0])])


async def _openai(state: ServerState, request: Request, body: OpenAIRequest, prompts: list[str],
                  max_tokens: int | None, chat: bool) -> Any:
    if body.n not in (None, 1):
        raise ApiError(400, f"n is {body.n}: saealign makes one choice per prompt, send n=1 (or vary seed)")
    if body.stop:
        raise ApiError(400, "stop sequences are not supported by saealign: leave stop out")
    topic_id, topic = await state.topic(body.topic)
    s = body.saealign
    greedy = s.greedy or body.temperature == 0  # OpenAI's temperature 0: the most likely token
    fields = s.spec_fields() | {"temperature": None if greedy else body.temperature, "greedy": greedy, "chat": chat}
    spec = state.spec(topic, s.method, max_tokens, fields)
    seed = body.seed or 0
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": ident, "created": int(time.time()), "model": state.model_name}
    if body.stream:
        if len(prompts) != 1:
            raise ApiError(400, "a stream has one prompt: send prompt as a string, not a list")
        job = await state.open_stream(prompts[0], seed, topic, spec)
        return sse_response(_openai_chunks(state, request, job, head, chat))
    result = await state.generate(prompts, [seed] * len(prompts), topic_id, topic, spec)
    choices = []
    for i, g in enumerate(result.generations):
        answer = {"message": {"role": "assistant", "content": g.text}} if chat else {"text": g.text, "logprobs": None}
        choices.append({"index": i, **answer, "finish_reason": FINISH[g.finish_reason],
                        "contamination": g.contamination})
    completion = sum(len(g.token_ids) for g in result.generations)
    prompt_tokens = sum(g.prompt_tokens for g in result.generations)
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "saealign": {"topic_id": topic_id, "method": spec.method, "mode": spec.mode, "strength": spec.strength,
                         "batch": result.batch,
                         "strength_used": [g.strength for g in result.generations]}}


async def _openai_chunks(state: ServerState, request: Request, job: StreamJob, head: dict[str, Any],
                         chat: bool) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, extra: dict[str, Any] | None = None) -> str:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {} if text is None else {"content": text}}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None}
        return sse({**head, "object": kind, "choices": [{**choice, "finish_reason": finish, **(extra or {})}]})

    if chat:
        yield sse({**head, "object": kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "finish_reason": None}]})
    async for item in state.events(request, job):
        if isinstance(item, TokenEvent):
            yield chunk(item.text, None, {"contamination": item.contamination})
        elif isinstance(item, Generation):
            yield chunk(None, FINISH[item.finish_reason])
        else:
            yield sse({"error": {"message": item.message, "type": "server_error", "code": 500}})
    yield sse("[DONE]")
