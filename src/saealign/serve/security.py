"""Who may call the server, and how often: an API key and a per-client rate limit (ASGI middleware).

Both answer in the API's own error shapes (:func:`~saealign.serve.http.error_response`), before any route
runs. ``/health`` stays open (liveness probes carry no key and are cheap), and so does the page (``/`` and
``/static``): it holds no data, and its API calls carry the key the user types when asked.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from saealign.serve.http import error_response

OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


class ApiKeyGate:
    """Refuse (401) calls without the key: ``Authorization: Bearer KEY`` (OpenAI clients) or ``X-API-Key: KEY``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]) or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(Request(scope), 401, "this server needs an API key: send it as "
                                                        "'Authorization: Bearer KEY' (or 'X-API-Key: KEY')")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        auth = _header(scope, b"authorization")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else _header(scope, b"x-api-key").strip()
        # constant time: the answer's timing must not tell how much of a guess was right
        return bool(given) and hmac.compare_digest(given.encode(), self.key)


class RateLimit:
    """A token bucket per client address: ``burst`` requests at once, refilled at ``per_minute``; over it, 429
    with ``Retry-After``. At most ``max_clients`` buckets are kept (the least recently seen go first)."""

    def __init__(self, app: ASGIApp, per_minute: float, burst: int, max_clients: int = 10_000) -> None:
        self.app, self.rate, self.burst, self.max_clients = app, per_minute / 60.0, float(burst), max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, last time)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        wait = self.take(self._client(scope), time.monotonic())
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        seconds = max(1, math.ceil(wait))
        response = error_response(Request(scope), 429, f"too many requests from this client (limit "
                                                        f"{self.rate * 60:g} a minute): retry in {seconds} s")
        response.headers["Retry-After"] = str(seconds)
        await response(scope, receive, send)

    def take(self, client: str, now: float) -> float:
        """Take one token from ``client``'s bucket: 0 when there was one, else the seconds until there is."""
        tokens, last = self.buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return wait

    @staticmethod
    def _client(scope: Scope) -> str:
        client = scope.get("client")
        return str(client[0]) if client else "unknown"
