"""The routes of :func:`saealign.serve.app.create_app`: saealign's own API and the OpenAI-compatible one.

OpenAI compatibility: ``/v1/completions`` and ``/v1/chat/completions`` accept OpenAI's request
fields and answer in OpenAI's schema (streams as ``chat.completion.chunk`` / ``text_completion``
events ending with ``data: [DONE]``), so existing clients work unchanged. Two extra fields choose
the alignment: ``topic`` (a topic id from ``POST /v1/topics``, or a list of topic texts) and
``saealign`` ({method, mode, strength, top_k, greedy}). ``temperature`` 0 means greedy; ``top_p``
and other sampling fields are ignored (saealign samples top-k, the paper's k = 5); ``stop`` and
``n`` > 1 are refused. Chat is single-turn: system messages are prepended to the one user message.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from saealign.serve.app import ApiError, GenerateRequest, Method, Mode, TopicRequest
from saealign.serve.batching import GenOptions, StreamEnd, StreamJob
from saealign.steering.aligner import Generation, TokenEvent

if TYPE_CHECKING:
    from saealign.reference.scoring import TopicScores
    from saealign.serve.app import ServerState

FINISH = {"eos": "stop", "length": "length"}


class SaealignOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    method: Method | None = None
    """Default: swap with a topic, none without."""
    mode: Mode = "error"
    strength: float | Literal["auto"] = "auto"
    top_k: int = 5
    greedy: bool = False


class OpenAIRequest(BaseModel):
    # OpenAI clients send fields saealign has no use for (top_p, user, ...): accept and ignore them
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str | None = None
    temperature: float | None = None
    n: int | None = 1
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    topic: str | list[str] | None = Field(None, description="a topic id, or the topic's texts")
    saealign: SaealignOptions = Field(default_factory=lambda: SaealignOptions())


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def add_routes(app: FastAPI, state: ServerState) -> None:
    """Register every API route of ``state`` on ``app``."""
    aligner = state.aligner

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        """Liveness, what is loaded, and the worker's counters (``batches``: generate calls run)."""
        worker = state.worker.snapshot() if state.worker else {}
        return {"status": "ok", "model": state.model_name, "layer": aligner.layer, "sae": aligner.sae_key,
                "d_sae": aligner.sae.d_sae, "index": aligner.index is not None, "topics": len(state.topics.topics),
                **worker, "limits": asdict(state.limits)}

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

        Stream events: ``data: {text, token_id, contamination, index}`` per token, then
        ``event: done`` with the whole generation (or ``event: error``).
        """
        prompts = state.prompts(body.prompt, body.prompts)
        seeds = state.seeds(body.seed, len(prompts))
        topic_id, topic = await state.topic(body.topic_id, body.topic_texts)
        options = state.options(topic, body.method, body.mode, body.strength, body.max_new_tokens, body.top_k,
                                body.temperature, body.greedy, body.chat)
        if body.stream:
            if len(prompts) != 1:
                raise ApiError(400, "a stream has one prompt: send prompt, not a list of prompts")
            job = await state.open_stream(prompts[0], seeds[0], topic, options)
            return sse_response(_generate_events(state, request, job, topic_id))
        result = await state.generate(prompts, seeds, topic_id, topic, options)
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
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
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
    pieces: list[str] = []
    ids: list[int] = []
    contamination: list[float] = []
    async for item in state.events(request, job):
        if isinstance(item, TokenEvent):
            pieces.append(item.text)
            ids.append(item.token_id)
            if item.contamination is not None:
                contamination.append(item.contamination)
            yield sse({"text": item.text, "token_id": item.token_id, "contamination": item.contamination,
                       "index": item.index})
        elif isinstance(item, StreamEnd):
            o = job.options
            yield sse({"prompt": job.prompt, "text": "".join(pieces), "tokens": pieces, "token_ids": ids,
                       "token_contamination": contamination if job.topic is not None else None,
                       "contamination": sum(contamination) / len(contamination) if contamination else None,
                       "finish_reason": item.finish_reason, "prompt_tokens": item.prompt_tokens,
                       "method": o.method, "mode": o.mode, "strength": _strength_used(state, job.topic, o),
                       "seed": job.seed,
                       "topic_id": topic_id}, event="done")
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
    if isinstance(body.topic, str):
        topic_id, topic = await state.topic(body.topic, None)
    else:
        topic_id, topic = await state.topic(None, body.topic)
    s = body.saealign
    temperature = 1.0 if body.temperature is None else body.temperature
    options = state.options(topic, s.method, s.mode, s.strength, max_tokens, s.top_k, temperature or 1.0,
                            s.greedy or temperature == 0, chat)
    seed = body.seed or 0
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": ident, "created": int(time.time()), "model": state.model_name}
    if body.stream:
        if len(prompts) != 1:
            raise ApiError(400, "a stream has one prompt: send prompt as a string, not a list")
        job = await state.open_stream(prompts[0], seed, topic, options)
        return sse_response(_openai_chunks(state, request, job, head, chat))
    result = await state.generate(prompts, [seed] * len(prompts), topic_id, topic, options)
    choices = []
    for i, g in enumerate(result.generations):
        answer = {"message": {"role": "assistant", "content": g.text}} if chat else {"text": g.text, "logprobs": None}
        choices.append({"index": i, **answer, "finish_reason": FINISH[g.finish_reason],
                        "contamination": g.contamination})
    completion = sum(len(g.token_ids) for g in result.generations)
    prompt_tokens = sum(result.prompt_tokens)
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "saealign": {"topic_id": topic_id, **_options_json(options), "batch": result.batch,
                         "strength_used": [g.strength for g in result.generations]}}


def _strength_used(state: ServerState, topic: TopicScores | None, o: GenOptions) -> float | str:
    """The number an ``auto`` strength resolved to (the stream's search cached it on the topic)."""
    if o.strength != "auto" or topic is None or o.method not in ("swap", "weight"):
        return 1.0 if o.strength == "auto" else o.strength
    return state.aligner.auto_strength(topic, o.method, o.mode).strength


def _options_json(o: GenOptions) -> dict[str, Any]:
    return {"method": o.method, "mode": o.mode, "strength": o.strength}


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
        elif isinstance(item, StreamEnd):
            yield chunk(None, FINISH[item.finish_reason])
        else:
            yield sse({"error": {"message": item.message, "type": "server_error", "code": 500}})
    yield sse("[DONE]")
