"""HTTP plumbing of the server: JSON errors in saealign's and OpenAI's shapes, and the request-body limit."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from saealign.errors import SaealignError
from saealign.serve.schemas import ApiError


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


def error_handlers(app: FastAPI) -> None:
    """Every mistake answers 4xx JSON (a bug 500 JSON), and the server keeps serving."""
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
