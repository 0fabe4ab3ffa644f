"""The HTTP API over a real socket: uvicorn on a free loopback port serving a tiny Aligner.

Expected answers come from a second, identical Aligner called directly (the served one's model
belongs to the server's worker thread), so every check is an identity with the library.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from conftest import LiveServer, make_aligner
from saealign.defaults import TOPICS_DIR
from saealign.serve.app import ServerLimits, create_app
from saealign.steering.aligner import Aligner, Generation, TokenEvent
from saealign.steering.slot import SLOT_TEMPLATE
from saealign.steering.spec import DEFAULT_METHOD
from saealign.steering.spec import GenerationSpec as Spec

CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
TOPIC_A = ["the cat sat on the old house", "a small dog runs near the river"]
TOPIC_B = ["the sun shines over the blue sky", "the moon and a star light the dark sky"]
LIMITS = ServerLimits(max_new_tokens=64, max_prompts=4, max_topic_texts=50, max_streams=2, batch_window_s=0.3)


@dataclass
class Served:
    url: str
    aligner: Aligner
    """The served Aligner (do not call it: its model belongs to the server)."""
    reference: Aligner
    """An identical Aligner with its own model, for expected answers."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEALIGN_CACHE", str(folder / "cache"))
        aligner, reference = (make_aligner(folder / "index", CHAT_TEMPLATE) for _ in range(2))
    with LiveServer(create_app(aligner, LIMITS)) as url:
        yield Served(url, aligner, reference)


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as c:
        yield c


def topic_id(client: httpx.Client, texts: list[str]) -> str:
    r = client.post("/v1/topics", json={"texts": texts})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """``(event name, data)`` of each Server-Sent Event."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


# -- the API --------------------------------------------------------------------------------------
def test_health_schema_examples_and_page(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert (health["status"], health["model"], health["layer"], health["d_sae"]) == ("ok", "tiny-llama", 0, 256)
    assert health["limits"]["max_new_tokens"] == 64
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/topics", "/v1/topics/{topic_id}", "/v1/generate", "/v1/completions", "/v1/chat/completions",
            "/health"} <= set(paths)
    examples = {e["name"]: e["texts"] for e in client.get("/v1/examples").json()["examples"]}
    assert set(examples) == {p.stem for p in TOPICS_DIR.glob("*.txt")} and "medical" in examples
    assert examples["medical"] == [t for t in (TOPICS_DIR / "medical.txt").read_text().splitlines() if t.strip()]
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in ('id="topic-texts"', 'id="score-btn"', 'id="latents"', 'id="prompt"', 'id="generate-btn"',
                    'id="plain-output"', 'id="steered-output"', "/static/app.js"):
        assert element in page.text
    assert "span.token" in client.get("/static/style.css").text and "getReader" in client.get("/static/app.js").text


def test_topic_create_and_get_match_the_library(client: httpx.Client, served: Served) -> None:
    r = client.post("/v1/topics", json={"texts": TOPIC_A + ["  "], "top": 3, "examples": 2, "min_prompts": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = served.reference.topic(TOPIC_A, min_prompts=10)
    assert [row["latent"] for row in body["top_latents"]] == expected.top(3)
    index = served.reference.index
    assert index is not None
    for row in body["top_latents"]:
        i = row["latent"]
        assert row["score"] == pytest.approx(float(expected.scores[i]), abs=1e-6)
        assert row["g"] == pytest.approx(float(expected.g[i]))
        assert row["prompts"] == int(expected.n_prompts[i])
        assert row["examples"] == [t for t, _ in index.top_texts(i, 2)]
    assert (body["texts"], body["scored"]) == (2, int(expected.scored.sum()))
    assert client.get(f"/v1/topics/{body['id']}", params={"top": 3}).json() == body
    again = client.post("/v1/topics", json={"texts": TOPIC_A, "top": 3, "examples": 2, "min_prompts": 10}).json()
    assert again["id"] == body["id"]  # the id is a hash of the texts and options
    assert topic_id(client, TOPIC_A) != body["id"]  # other min_prompts: another topic


def test_generate_matches_the_library(client: httpx.Client, served: Served) -> None:
    tid = topic_id(client, TOPIC_A)
    prompts = ["the cat sat on the", "a dog"]
    r = client.post("/v1/generate", json={"prompts": prompts, "topic_id": tid, "method": "swap", "mode": "replace",
                                          "greedy": True, "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    got = r.json()["generations"]
    want = served.reference.generate(prompts, TOPIC_A, Spec("swap", "replace", greedy=True, max_new_tokens=6))
    assert [g["token_ids"] for g in got] == [w.token_ids for w in want]
    assert [g["text"] for g in got] == [w.text for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["token_contamination"] == pytest.approx(w.token_contamination, abs=1e-5)
        assert (g["prompt"], g["method"], g["mode"], g["topic_id"], g["finish_reason"]) == (
            w.prompt, "swap", "replace", tid, w.finish_reason)
    # without a topic the method defaults to none, and nothing is measured
    plain = client.post("/v1/generate", json={"prompt": "a dog", "greedy": True, "max_new_tokens": 4}).json()
    only = plain["generations"][0]
    assert (only["method"], only["contamination"], only["topic_id"]) == ("none", None, None)
    assert only["token_ids"] == served.reference.generate("a dog", spec=Spec("none", greedy=True,
                                                                              max_new_tokens=4))[0].token_ids


def test_a_request_without_a_temperature_samples_at_the_methods_default(client: httpx.Client, served: Served) -> None:
    tid = topic_id(client, TOPIC_A)
    prompts = ["the cat sat on the", "a dog"]
    body = {"prompts": prompts, "topic_id": tid, "max_new_tokens": 16, "seed": 1, "slot_push": 0}

    def ids(spec: Spec) -> list[list[int]]:
        return [g.token_ids for g in served.reference.generate(prompts, TOPIC_A, spec, seed=1)]

    hot, cool = ids(Spec(max_new_tokens=16, slot_push=0)), ids(Spec(max_new_tokens=16, slot_push=0, temperature=1.0))
    assert hot != cool  # the two temperatures sample different text here, so the comparisons below can tell them apart
    got = client.post("/v1/generate", json=body)
    assert got.status_code == 200, got.text
    assert [g["token_ids"] for g in got.json()["generations"]] == hot  # add's default, 1.2
    named = client.post("/v1/generate", json={**body, "temperature": 1.0}).json()["generations"]
    assert [g["token_ids"] for g in named] == cool


def test_one_topic_shape_in_every_route_and_every_spec_field(client: httpx.Client, served: Served) -> None:
    """``topic`` (an id or texts) in every route, the old names as aliases; the spec fields the CLI has."""
    tid = topic_id(client, TOPIC_A)
    body = {"prompt": "the cat sat on the", "method": "clamp", "clamp_n": 2, "clamp_multiplier": 3.0,
            "steer_prompt": False, "greedy": True, "max_new_tokens": 5}
    want = served.reference.generate("the cat sat on the", TOPIC_A, Spec(
        "clamp", clamp_n=2, clamp_multiplier=3.0, steer_prompt=False, greedy=True, max_new_tokens=5))[0]
    for topic in ({"topic": tid}, {"topic": TOPIC_A}, {"topic_id": tid}, {"topic_texts": TOPIC_A}):
        r = client.post("/v1/generate", json={**body, **topic})
        assert r.status_code == 200, r.text
        got = r.json()["generations"][0]
        assert (got["token_ids"], got["topic_id"]) == (want.token_ids, tid)
        assert got["n_changed"] == want.n_changed and got["prompt_tokens"] == want.prompt_tokens == 6
    both = client.post("/v1/generate", json={**body, "topic": tid, "topic_id": tid})
    assert both.status_code == 400 and "give the topic once" in both.json()["error"]
    huge = client.post("/v1/generate", json={**body, "method": "swap", "strength": 1e308, "topic": tid})
    assert huge.status_code == 400 and "strength for swap must be between 0 and 8" in huge.json()["error"]
    boost = client.post("/v1/generate", json={**body, "method": "add", "prompt_boost": 40, "topic": tid})
    assert boost.status_code == 400 and "prompt_boost must be a number from 0 to 10" in boost.json()["error"]
    tuned = client.post("/v1/generate", json={**body, "method": "add", "tune_steps": 2, "topic": tid})
    want = served.reference.generate("the cat sat on the", TOPIC_A, Spec("add", tune_steps=2, steer_prompt=False,
                                                                          greedy=True, max_new_tokens=5))[0]
    assert tuned.status_code == 200 and tuned.json()["generations"][0]["token_ids"] == want.token_ids
    health = client.get("/health").json()
    assert health["methods"] == ["none", "sae", "clamp", "swap", "weight", "add", "swap_add", "diffmean"]


def test_auto_strength_is_resolved_reported_and_shown_on_the_topic(client: httpx.Client, served: Served) -> None:
    tid = topic_id(client, TOPIC_A)
    r = client.post("/v1/generate", json={"prompt": "the cat sat on the", "topic_id": tid, "greedy": True,
                                          "max_new_tokens": 4, "strength": "auto"})  # the default method
    assert r.status_code == 200, r.text
    got = r.json()["generations"][0]
    # greedy: the search samples its probes at 1 (a sampled request's, at its own temperature)
    chosen = served.reference.auto_strength(served.reference.topic(TOPIC_A), Spec(strength="auto", greedy=True))
    assert (got["method"], got["strength"]) == (DEFAULT_METHOD, chosen.strength)
    want = served.reference.generate("the cat sat on the", TOPIC_A, Spec(strength=chosen.strength, greedy=True,
                                                                           max_new_tokens=4))[0]
    assert got["token_ids"] == want.token_ids
    # earlier requests may have searched this topic for other methods or modes too
    (auto,) = [a for a in client.get(f"/v1/topics/{tid}").json()["auto_strength"]
               if (a["method"], a["mode"]) == (DEFAULT_METHOD, "error")]
    assert auto["strength"] == chosen.strength
    assert auto["ppl_ratio"] == pytest.approx(chosen.ppl_ratio)
    bad = client.post("/v1/generate", json={"prompt": "a dog", "topic_id": tid, "strength": "strong"})
    assert bad.status_code == 422 and "strength" in bad.json()["error"]


def test_generate_stream_sends_one_event_per_token_then_done(client: httpx.Client, served: Served) -> None:
    tid = topic_id(client, TOPIC_B)
    body = {"prompt": "the cat sat on the", "topic_id": tid, "method": "weight", "greedy": True,
            "max_new_tokens": 7, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    *want, whole = served.reference.stream("the cat sat on the", TOPIC_B, Spec("weight", greedy=True, max_new_tokens=7))
    assert isinstance(whole, Generation)
    tokens = [json.loads(d) for name, d in events if name == "message"]
    assert [name for name, _ in events] == ["message"] * len(want) + ["done"]
    assert [TokenEvent(t["text"], t["token_id"], t["contamination"], t["index"]) for t in tokens] == [
        TokenEvent(w.text, w.token_id, pytest.approx(w.contamination, abs=1e-5), w.index) for w in want]
    done = json.loads(events[-1][1])
    assert done["text"] == "".join(w.text for w in want) and done["token_ids"] == [w.token_id for w in want]
    assert done["contamination"] == pytest.approx(sum(t["contamination"] for t in tokens) / len(tokens))
    assert (done["topic_id"], done["method"]) == (tid, "weight")
    # the done event is the library's Generation, as the non-streamed answer gives it
    assert {k: v for k, v in done.items() if k not in ("topic_id", "token_contamination", "contamination")} == {
        k: v for k, v in whole.to_json().items() if k not in ("topic_index", "token_contamination", "contamination")}


def test_concurrent_requests_with_different_topics_share_one_batch(client: httpx.Client, served: Served) -> None:
    a, b = topic_id(client, TOPIC_A), topic_id(client, TOPIC_B)
    jobs = [("the cat sat on the", a, TOPIC_A), ("a dog runs near the", b, TOPIC_B)]

    def send(prompt: str, tid: str) -> dict[str, Any]:
        r = httpx.post(f"{served.url}/v1/generate", timeout=30, json={
            "prompt": prompt, "topic_id": tid, "method": "swap", "greedy": True, "max_new_tokens": 5})
        assert r.status_code == 200, r.text
        return r.json()

    # known topics: their strength searches (on the search thread) are done, so both requests reach the
    # worker at once (a request still waiting for its search joins a later batch)
    for prompt, tid, _ in jobs:
        send(prompt, tid)
    before = client.get("/health").json()["batches"]

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, [p for p, _, _ in jobs], [t for _, t, _ in jobs]))
    assert client.get("/health").json()["batches"] == before + 1
    assert answers[0]["batch"] == answers[1]["batch"] == before + 1
    assert answers[0]["batch_rows"] == answers[1]["batch_rows"] == 2
    for answer, (prompt, tid, texts) in zip(answers, jobs, strict=True):
        got = answer["generations"][0]
        want = served.reference.generate(prompt, texts, Spec("swap", greedy=True, max_new_tokens=5))[0]
        # each row was steered by, and measured against, its own topic
        assert (got["prompt"], got["topic_id"], got["token_ids"]) == (prompt, tid, want.token_ids)
        assert got["token_contamination"] == pytest.approx(want.token_contamination, abs=1e-5)


def test_openai_client_completions_and_chat(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    with httpx.Client(base_url=served.url) as h:
        tid = topic_id(h, TOPIC_A)
    ref = served.reference
    want = ref.generate("the cat sat on the", TOPIC_A, Spec(greedy=True, max_new_tokens=5))[0]  # the server's default
    done = client.completions.create(model="any", prompt="the cat sat on the", max_tokens=5, temperature=0,
                                     extra_body={"topic": tid})
    assert (done.object, done.model, len(done.choices)) == ("text_completion", "tiny-llama", 1)
    assert done.choices[0].text == want.text
    assert done.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
    # <s> + 5 words, read after the default's concept slot template (the tokens the model read)
    template = len(ref.lm.tokenizer(SLOT_TEMPLATE, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (6 + template, len(want.token_ids))
    pieces = [c.choices[0].text for c in client.completions.create(
        model="any", prompt="the cat sat on the", max_tokens=5, temperature=0, stream=True, extra_body={"topic": tid})]
    assert "".join(pieces) == want.text and len(pieces) == len(want.token_ids) + 1  # + the finish chunk

    chat_want = ref.generate("a dog", TOPIC_B, Spec("weight", greedy=True, max_new_tokens=4, chat=True))[0]
    options = {"topic": TOPIC_B, "saealign": {"method": "weight"}}
    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "a dog"}], max_tokens=4,
                                          temperature=0, extra_body=options)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat_want.text
    stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "a dog"}],
                                            max_tokens=4, temperature=0, stream=True, extra_body=options)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="n is 2"):
        client.completions.create(model="any", prompt="a dog", n=2)
    with pytest.raises(openai.BadRequestError, match="one user message"):
        client.chat.completions.create(model="any", messages=[{"role": "assistant", "content": "a dog"}])


@pytest.mark.parametrize(("path", "send", "status", "needle"), [
    ("/v1/generate", {"content": b'{"prompt": "a dog", ', "headers": {"content-type": "application/json"}}, 400,
     "malformed JSON"),
    ("/v1/generate", {"json": {"prompt": "a dog", "topic_id": "nope"}}, 404, "unknown topic id 'nope'"),
    ("/v1/generate", {"json": {"prompt": "  "}}, 400, "prompt 0 is empty"),
    ("/v1/generate", {"json": {"prompts": []}}, 400, "prompts is empty"),
    ("/v1/generate", {"json": {"prompt": "a dog", "max_new_tokens": 65}}, 400, "limit of 64"),
    ("/v1/generate", {"json": {"prompt": "a dog", "max_new_tokens": 0}}, 400, "at least 1"),
    ("/v1/generate", {"json": {"prompt": "a dog", "method": "swap"}}, 400, "needs a topic"),
    ("/v1/generate", {"json": {"prompt": "a dog", "topic": ["the cat sat on the mat"], "tune_steps": 33}}, 400, "tune_steps is 33, more than this server's limit of 32"),
    ("/v1/generate", {"json": {"prompt": "a dog", "method": "none", "tune_steps": 2}}, 400, "tune_steps tunes add's mix"),
    ("/v1/generate", {"json": {"prompt": "a dog", "topic": ["the cat sat on the mat"], "slot_push": 5}}, 400,
     "slot_push must be a number from 0 to 4"),
    ("/v1/generate", {"json": {"prompt": "a dog", "promt": 1}}, 422, "promt: Extra inputs are not permitted"),
    ("/v1/generate", {"json": {"prompt": " ".join(["dog"] * 100), "max_new_tokens": 64}}, 400, "context of 128"),
    ("/v1/generate", {"json": {"prompt": " ".join(["dog"] * 100), "max_new_tokens": 64, "stream": True}}, 400,
     "context of 128"),
    ("/v1/generate", {"json": {"prompts": ["a dog", "a cat"], "stream": True}}, 400, "a stream has one prompt"),
    ("/v1/generate", {"content": b"x" * 10_000_000}, 413, "limit of 1000000"),
    ("/v1/generate", {"content": b'{"prompt": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, 400,
     "not UTF-8"),
    ("/v1/topics", {"json": {"texts": ["the cat"] * 51}}, 413, "limit of 50"),
    ("/v1/topics", {"json": {"texts": [" "]}}, 400, "no texts"),
    ("/v1/topics/nope", None, 404, "unknown topic id"),
    ("/v1/nothing", None, 404, "Not Found"),
])
def test_bad_input_is_4xx_json_and_the_server_keeps_serving(client: httpx.Client, path: str, send: dict | None,
                                                            status: int, needle: str) -> None:
    r = client.get(path) if send is None else client.post(path, **send)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    assert client.get("/health").json()["status"] == "ok"


def test_streams_interleave_and_a_disconnected_stream_frees_its_slot(
    client: httpx.Client, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    produced: list[tuple[str, int]] = []
    real_stream = served.aligner.stream
    gated = threading.Event()  # set: the stream holds its second token until the client has left
    left = threading.Event()

    def slow_stream(prompt: str, *args: Any, **kwargs: Any) -> Iterator[TokenEvent | Generation]:
        for event in real_stream(prompt, *args, **kwargs):
            if gated.is_set() and isinstance(event, TokenEvent) and event.index >= 1:
                left.wait(10)  # not a race: the client is gone before the stream could end on its own
                time.sleep(0.05)
            else:
                time.sleep(0.01)  # a slow model: the streams interleave
            if isinstance(event, TokenEvent):
                produced.append((prompt, event.index))
            yield event

    monkeypatch.setattr(served.aligner, "stream", slow_stream)
    body = {"method": "none", "greedy": True, "max_new_tokens": 20, "stream": True}

    def read(prompt: str) -> int:
        with httpx.stream("POST", f"{served.url}/v1/generate", json={**body, "prompt": prompt}, timeout=30) as r:
            return sum(name == "message" for name, _ in sse_events(r.iter_lines()))

    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(read, ["a dog", "the cat"]))
    assert counts == [20, 20]
    last_dog = max(i for i, (p, _) in enumerate(produced) if p == "a dog")
    assert any(p == "the cat" for p, _ in produced[:last_dog])  # the two streams grew side by side

    before = client.get("/health").json()
    gated.set()
    with client.stream("POST", "/v1/generate", json={**body, "prompt": "a dog", "max_new_tokens": 64}) as r:
        lines = r.iter_lines()
        assert next(sse_events(lines))[0] == "message"  # one token, then the client leaves
    left.set()
    deadline = time.monotonic() + 10
    while (now := client.get("/health").json())["streams_active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert now["streams_active"] == 0 and now["streams_cancelled"] == before["streams_cancelled"] + 1
    assert sum(p == "a dog" for p, _ in produced) < 20 + 64  # it stopped early
    gated.clear()
    assert read("the cat") == 20  # the next stream is served
