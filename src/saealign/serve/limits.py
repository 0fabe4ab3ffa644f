"""How the server holds under hostile clients: :class:`ServerGuard` (each protection an option with a safe
default) and the per-request token budget.

A request's cost is the token slots it makes the model hold: ``rows x (longest prompt + max_new_tokens)``
(rows of a batch are padded to the longest prompt, and each row grows by ``max_new_tokens``). Memory and
time of a generation grow with it, so one budget per request, and one per batch of requests the worker
runs together, bound both: the worst request the limits allow is measured in docs (``bench_server_guard``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.serve.schemas import ApiError
from saealign.steering.plan import encode_prompt
from saealign.steering.spec import GenerationSpec

AUTO_POLICIES = ("wait", "fallback", "off")


@dataclass(frozen=True)
class ServerGuard:
    """The server's protections (``saealign serve`` options; the README's "Serving safely")."""

    api_key: str | None = field(default=None, repr=False)
    """Required as ``Authorization: Bearer KEY`` (what OpenAI clients send) or ``X-API-Key``; None: open.
    ``/health`` and the page stay open (the page asks for the key when the API answers 401)."""
    rate_per_minute: float = 300.0
    """Requests per client (IP address) per minute, refilled continuously; 0 = no limit."""
    rate_burst: int = 60
    """Requests a client may send at once before the rate applies."""
    max_request_tokens: int = 4096
    """Token slots one request may use: rows x (longest prompt + max_new_tokens)."""
    max_batch_tokens: int = 8192
    """Token slots of one model call when the worker batches several requests together."""
    auto_strength: str = "wait"
    """``strength=auto`` for a topic whose search has not run: ``wait`` for it (on its own thread and model
    copy: other requests keep flowing), serve at :func:`fallback_spec`'s strength at once (``fallback``; the search
    runs meanwhile), or refuse ``auto`` (``off``: no search, no model copy)."""
    max_searches: int = 4
    """Strength searches running or queued; a request that would start one more gets 429."""

    def __post_init__(self) -> None:
        if self.auto_strength not in AUTO_POLICIES:
            raise SaealignError(f"auto_strength must be one of {', '.join(AUTO_POLICIES)}, got {self.auto_strength!r}")
        if self.rate_per_minute < 0 or self.rate_burst < 1:
            raise SaealignError("rate_per_minute must be >= 0 (0 = no limit) and rate_burst >= 1")
        if self.max_request_tokens < 1 or self.max_batch_tokens < self.max_request_tokens or self.max_searches < 1:
            raise SaealignError("max_request_tokens and max_searches must be >= 1, max_batch_tokens >= max_request_tokens")
        if self.api_key is not None and len(self.api_key) < 8:
            raise SaealignError("the API key must have at least 8 characters")

    def public(self) -> dict[str, Any]:
        """What ``/health`` shows: everything but the key itself."""
        out = dataclasses.asdict(self)
        del out["api_key"]
        return out | {"api_key_required": self.api_key is not None}


def fallback_spec(spec: GenerationSpec) -> GenerationSpec:
    """What ``auto_strength="fallback"`` serves while a topic's search runs: ``spec`` at its method's default
    strength (the paper's 1 for Swap/Weight; add and diffmean 0.05, add 0.35 with feedback; swap_add 0.3)."""
    return replace(spec, strength=None)


class TokenBudget:
    """Counts a request's token slots with its own copy of the tokenizer (the model thread uses the original:
    fast tokenizers are not safe to share between threads) and refuses what exceeds the budget."""

    def __init__(self, lm: LoadedModel, max_request_tokens: int) -> None:
        self.counter = dataclasses.replace(lm, tokenizer=copy.deepcopy(lm.tokenizer))
        self.max_request_tokens = max_request_tokens

    def cost(self, prompts: list[str], spec: GenerationSpec) -> int:
        """``rows x (longest prompt + max_new_tokens)``; a prompt too long for the model raises its one line."""
        longest = max(len(encode_prompt(self.counter, i, p, spec.chat, spec.max_new_tokens)[1])
                      for i, p in enumerate(prompts))
        return len(prompts) * (longest + spec.max_new_tokens)

    def check(self, prompts: list[str], spec: GenerationSpec) -> int:
        """The request's cost, or 413 when it is over the budget."""
        cost = self.cost(prompts, spec)
        if cost > self.max_request_tokens:
            longest = cost // len(prompts) - spec.max_new_tokens
            raise ApiError(413, f"this request needs {cost} token slots ({len(prompts)} rows x ({longest} prompt + "
                                f"{spec.max_new_tokens} new tokens)), more than this server's budget of "
                                f"{self.max_request_tokens}: send fewer or shorter prompts, or ask for fewer tokens")
        return cost
