"""The server under hostile clients: API key, rate limit, token budgets, and strength searches off the
model thread (known topics keep flowing while a new topic's search runs)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from conftest import LiveServer, make_aligner
from saealign.cli.app import main
from saealign.errors import SaealignError
from saealign.serve.app import ServerLimits, create_app
from saealign.serve.batching import GenerateJob, ModelWorker
from saealign.serve.limits import ServerGuard, TokenBudget
from saealign.serve.searches import StrengthSearches
from saealign.serve.security import RateLimit
from saealign.steering.aligner import Aligner
from saealign.steering.spec import DEFAULT_METHOD, DEFAULT_STRENGTH, GenerationSpec

KEY = "s3cret-key-for-tests"
TOPIC_A = ["the cat sat on the old house", "a small dog runs near the river"]
TOPIC_B = ["the sun shines over the blue sky", "the moon and a star light the dark sky"]
LIMITS = ServerLimits(max_new_tokens=16, max_prompts=4, max_topic_texts=10, batch_window_s=0.0)


@pytest.fixture(scope="module")
def aligner(tmp_path_factory: pytest.TempPathFactory) -> Aligner:
    folder = tmp_path_factory.mktemp("guard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEALIGN_CACHE", str(folder / "cache"))
        return make_aligner(folder / "index", "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}")


def serve(aligner: Aligner, **guard: object) -> LiveServer:
    return LiveServer(create_app(aligner, LIMITS, ServerGuard(**guard)))  # type: ignore[arg-type]


# -- the API key ---------------------------------------------------------------------------------------------
def test_api_key_is_required_except_for_health_and_the_page(aligner: Aligner) -> None:
    with serve(aligner, api_key=KEY) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        body = {"prompt": "the cat", "max_new_tokens": 2, "greedy": True}
        missing = c.post("/v1/generate", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "needs an API key" in missing.json()["error"]
        assert c.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong-key-123"}).status_code == 401
        assert c.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.post("/v1/generate", json=body, headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/v1/models").status_code == 401
        # OpenAI routes answer in OpenAI's error shape, and OpenAI's client sends the key as a Bearer token
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 401 and chat.json()["error"]["code"] == 401
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        assert good.completions.create(model="m", prompt="the cat", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key").models.list()
        assert c.get("/health").json()["limits"]["api_key_required"] is True
        assert KEY not in c.get("/health").text


def test_short_keys_are_refused() -> None:
    with pytest.raises(SaealignError, match="at least 8"):
        ServerGuard(api_key="abc")


# -- the rate limit ------------------------------------------------------------------------------------------
def test_token_bucket_arithmetic() -> None:
    limit = RateLimit(app=None, per_minute=60, burst=3)  # type: ignore[arg-type]
    assert [limit.take("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert limit.take("a", 0.0) == pytest.approx(1.0)  # empty: one token a second
    assert limit.take("b", 0.0) == 0  # another client has its own bucket
    assert limit.take("a", 1.0) == 0 and limit.take("a", 1.0) == pytest.approx(1.0)
    assert limit.take("a", 100.0) == 0 and limit.buckets["a"][0] == 2  # refilled to the burst, not beyond


def test_rate_limit_answers_429_and_keeps_health_open(aligner: Aligner) -> None:
    with serve(aligner, rate_per_minute=6, rate_burst=2) as url, httpx.Client(base_url=url, timeout=30) as c:
        codes = [c.get("/v1/models").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        limited = c.get("/v1/models")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "too many requests" in limited.json()["error"]["message"]
        assert all(c.get("/health").status_code == 200 for _ in range(5))


# -- token budgets ---------------------------------------------------------------------------------------------
def test_request_cost_is_rows_times_longest_plus_new(aligner: Aligner) -> None:
    budget = TokenBudget(aligner.lm, 100)
    tok = aligner.lm.tokenizer
    prompts = ["the cat", "the old house by the river"]
    longest = max(len(tok(p)["input_ids"]) for p in prompts)
    spec = GenerationSpec(method="none", max_new_tokens=5)
    assert budget.cost(prompts, spec) == 2 * (longest + 5)


def test_over_budget_requests_get_413_before_any_work(aligner: Aligner) -> None:
    with serve(aligner, max_request_tokens=40, max_batch_tokens=40) as url, httpx.Client(base_url=url, timeout=30) as c:
        long = " ".join(["the cat"] * 10)  # 21 tokens with <s>
        r = c.post("/v1/generate", json={"prompts": [long, long], "max_new_tokens": 8, "method": "none"})
        assert r.status_code == 413 and "2 rows x (21 prompt + 8 new tokens)" in r.json()["error"]
        assert c.post("/v1/generate", json={"prompt": long, "max_new_tokens": 8, "method": "none"}).status_code == 200
        assert c.get("/health").json()["batches"] == 1  # the refused request never reached the model


def test_batches_stay_within_the_batch_budget() -> None:
    async def take() -> list[list[int]]:
        worker = ModelWorker.__new__(ModelWorker)
        worker.max_batch_rows, worker.max_batch_tokens = 32, 100
        spec = GenerationSpec(method="none")
        from collections import deque

        worker.pending = deque(GenerateJob(["p"] * rows, [0] * rows, None, None, spec, row_tokens=width)
                               for rows, width in ((2, 20), (2, 30), (1, 10), (4, 10)))
        batches = []
        while worker.pending:
            batches.append([len(j.prompts) for j in worker._take_batch()])
        return batches

    # rows x widest: 2x20 with 2x30 would be 4 x 30 = 120 > 100, with 1x10 it is 3 x 20 = 60; with 4x10 also
    # 7 x 20 = 140: no. Then 2x30 alone (with 4x10: 6 x 30 = 180), then 4x10.
    assert asyncio.run(take()) == [[2, 1], [2], [4]]


# -- strength searches off the model thread ---------------------------------------------------------------------
class Gate:
    """Holds every strength search until :meth:`open` (and counts them), so a test controls when they end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.event, self.started, self.threads = threading.Event(), threading.Event(), []
        real = StrengthSearches._search

        def held(searches: StrengthSearches, topic: object, spec: GenerationSpec) -> object:
            self.threads.append(threading.current_thread().name)
            self.started.set()
            assert self.event.wait(60)
            return real(searches, topic, spec)  # type: ignore[arg-type]

        monkeypatch.setattr(StrengthSearches, "_search", held)

    def open(self) -> None:
        self.event.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate(monkeypatch)
    yield g
    g.open()


def generate(url: str, topic: list[str], **extra: object) -> httpx.Response:
    # strength "auto" unless told: these tests are about the searches it starts (the default is a number)
    body = {"prompt": "the cat", "topic": topic, "max_new_tokens": 3, "greedy": True, "strength": "auto", **extra}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=120)


def test_known_topics_flow_while_a_new_topic_searches(aligner: Aligner, gate: Gate) -> None:
    with serve(aligner) as url, ThreadPoolExecutor(2) as pool:
        gate.open()
        first = generate(url, TOPIC_A)  # A's search runs and ends: A is known
        assert first.status_code == 200
        gate.event.clear()
        gate.started.clear()
        waiting = pool.submit(generate, url, TOPIC_B)  # B's search starts and is held
        assert gate.started.wait(30)
        start = time.monotonic()
        for extra in ({}, {"strength": 2.0}, {"method": "none"}):
            assert generate(url, TOPIC_A, **extra).status_code == 200
        assert time.monotonic() - start < 30 and not waiting.done()  # B still waits for its search
        assert httpx.get(f"{url}/health").json()["searches"] == 1
        gate.open()
        answer = waiting.result(60)
        assert answer.status_code == 200
        chosen = answer.json()["generations"][0]["strength"]
        assert isinstance(chosen, float) and chosen == generate(url, TOPIC_B).json()["generations"][0]["strength"]
    assert set(gate.threads) == {"saealign-search_0"}  # never on the model thread


def test_fallback_serves_at_once_at_the_stated_strength(aligner: Aligner, gate: Gate) -> None:
    with serve(aligner, auto_strength="fallback") as url:
        answer = generate(url, TOPIC_B)
        # the stated fallback of the default method (fallback_spec: its default strength)
        assert answer.status_code == 200 and answer.json()["generations"][0]["strength"] == DEFAULT_STRENGTH[DEFAULT_METHOD]
        assert gate.started.wait(30)  # the search runs meanwhile
        gate.open()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").json()["searches"] and time.monotonic() < deadline:
            time.sleep(0.1)
        after = generate(url, TOPIC_B).json()["generations"][0]["strength"]
        assert after == aligner.auto_strength(aligner.topic(TOPIC_B), GenerationSpec(strength="auto")).strength


def test_search_limit_and_off(aligner: Aligner, gate: Gate) -> None:
    with serve(aligner, max_searches=1, auto_strength="fallback") as url:
        assert generate(url, TOPIC_A).status_code == 200  # its search holds the one slot
        assert gate.started.wait(30)
        busy = generate(url, TOPIC_B)
        assert busy.status_code == 429 and "strength searches" in busy.json()["error"]
        assert generate(url, TOPIC_B, strength=1.0).status_code == 200  # a number never needs a search
    with serve(aligner, auto_strength="off") as url:
        off = generate(url, TOPIC_B)
        assert off.status_code == 400 and "give a number" in off.json()["error"]


# -- the command ----------------------------------------------------------------------------------------------
def test_serve_beyond_loopback_needs_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAEALIGN_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "never_loaded")])
    assert result.exit_code != 0 and "--api-key" in result.output and "no model" not in result.output
    result = CliRunner().invoke(main, ["serve", "--auto-strength", "sometimes"])
    assert result.exit_code != 0 and "sometimes" in result.output


# -- absurd strengths (issue 14, item 4) ------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1e308, -1.0, 9.0, "1e308", "Infinity"])
def test_absurd_strengths_are_refused(aligner: Aligner, strength: object) -> None:
    with serve(aligner) as url:
        r = generate(url, TOPIC_A, strength=strength)
        assert r.status_code in (400, 422), r.text
        assert "strength" in r.json()["error"]
        json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))  # never Infinity/NaN
