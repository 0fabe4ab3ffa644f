"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): no 5xx, no hang, the server alive after.

The server is the real one (uvicorn on a loopback port) over a tiny Aligner. Every operation in
``/openapi.json`` gets generated requests, valid and invalid (``positive`` and ``negative`` modes:
wrong types, missing fields, out-of-range numbers, odd strings); each must answer below 500 within
``TIMEOUT_S``. The last tests check that the server still answers ``/health`` and a real generation.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from conftest import LiveServer, make_aligner
from saealign.serve.app import ServerGuard, ServerLimits, create_app

schemathesis = pytest.importorskip("schemathesis")

TIMEOUT_S = 60.0
"""No single request may take longer (a hang fails the test instead of stalling CI)."""
EXAMPLES = 100
"""Generated requests per operation and mode (positive/negative)."""
# Small limits keep each generation short: the fuzzer explores the API, not the model's speed.
LIMITS = ServerLimits(max_new_tokens=6, max_prompts=3, max_topic_texts=8, max_streams=2, batch_window_s=0.0)
# No rate limit (the fuzzer is one client sending ~25 requests a second: 429s would hide the routes), small
# token budgets; searches wait (the default).
GUARD = ServerGuard(rate_per_minute=0, max_request_tokens=256, max_batch_tokens=512)
CASES: Counter[str] = Counter()
"""Requests sent, by status class, for the closing report."""


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEALIGN_CACHE", str(folder / "cache"))
        aligner = make_aligner(folder / "index", "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}")
    with LiveServer(create_app(aligner, LIMITS, GUARD)) as url:
        yield url


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_error_and_no_hang(fuzz_url: str, mode: str) -> None:
    """Every operation of the schema, ``EXAMPLES`` generated requests each (schemathesis + hypothesis)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", timeout=TIMEOUT_S)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/generate", "/v1/topics", "/v1/chat/completions"}
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:  # noqa: ANN001 - a schemathesis Case
            started = time.monotonic()
            response = case.call(base_url=fuzz_url, timeout=TIMEOUT_S)
            CASES[f"{response.status_code // 100}xx"] += 1
            seconds = time.monotonic() - started
            if response.status_code >= 500 or seconds >= TIMEOUT_S:
                failures.append(f"{case.method} {case.path} {case.body!r:.200}: {response.status_code} "
                                f"in {seconds:.1f} s: {response.text[:200]}")

        try:
            run()
        except Unsatisfiable:
            assert mode == "negative", operation.path  # nothing to get wrong in a request without inputs
    assert not failures, "\n".join(failures[:10])


def test_server_alive_after_the_fuzz(fuzz_url: str) -> None:
    total = sum(CASES.values())
    print(f"fuzz: {total} requests, by status {dict(sorted(CASES.items()))}")
    assert total >= 2 * EXAMPLES and "5xx" not in CASES
    with httpx.Client(base_url=fuzz_url, timeout=TIMEOUT_S) as client:
        assert client.get("/health").json()["status"] == "ok"
        r = client.post("/v1/generate", json={"prompt": "the cat", "max_new_tokens": 3, "greedy": True})
        assert r.status_code == 200 and r.json()["generations"][0]["text"] is not None
