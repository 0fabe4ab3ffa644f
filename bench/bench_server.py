"""Load benchmark of ``saealign serve``: concurrent clients vs one client, same server, same run.

Run: ``python bench/bench_server.py [--clients 8] [--seconds 60] [--tokens 32]``.

Starts ``saealign serve`` (the default model, SAE and index: built once and cached) as a separate
process on a free loopback port, scores one topic, then

1. **sequential**: one client sends ``POST /v1/generate`` requests back to back for ``--seconds``;
2. **concurrent**: ``--clients`` clients do the same at once, for the same time.

Each request is one prompt (cycled from a fixed list), Swap with the topic, ``--tokens`` new tokens,
top-k 5. Prints requests served, errors (must be 0), p50/p99 latency and throughput of both phases,
and the throughput ratio concurrent / sequential: the server batches concurrent requests into one
forward pass per step, so it should be well above 1. Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = ["My heart is broken so I should", "The best way to spend a weekend is", "In the morning I usually",
           "The city council decided to", "She opened the letter and", "After the long meeting we",
           "The old house at the end of the street", "When the rain finally stopped"]
TOPIC = ["The patient was diagnosed with type 2 diabetes and started on metformin.",
         "Symptoms of influenza include fever, cough, sore throat and muscle aches.",
         "An MRI scan showed a small tear in the anterior cruciate ligament.",
         "Hypertension raises the risk of stroke, heart attack and kidney disease.",
         "The surgeon removed the inflamed appendix under general anaesthesia."]


@dataclass
class Phase:
    """What one load phase measured."""

    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
        return (f"{self.name:>10}: {len(lat)} requests in {self.seconds:.1f} s, {len(self.errors)} errors, "
                f"p50 {p50:.2f} s, p99 {p99:.2f} s, {self.requests_per_s:.2f} req/s, {self.tokens_per_s:.1f} tok/s")

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, layer: int | None, timeout_s: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", "from saealign.cli.app import main; main()", "serve", "--port", str(port)]
    if layer is not None:
        cmd += ["--layer", str(layer)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it answered /health")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {timeout_s:.0f} s")


async def client(http: httpx.AsyncClient, phase: Phase, topic_id: str, tokens: int, start: int, stop_at: float) -> None:
    i = start
    while time.monotonic() < stop_at:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "topic_id": topic_id, "method": "swap",
                "max_new_tokens": tokens, "top_k": 5, "seed": i}
        t0 = time.monotonic()
        try:
            r = await http.post("/v1/generate", json=body)
            if r.status_code != 200:
                phase.errors.append(f"{r.status_code}: {r.text[:200]}")
            else:
                phase.latencies.append(time.monotonic() - t0)
                phase.tokens += sum(len(g["token_ids"]) for g in r.json()["generations"])
        except httpx.HTTPError as e:
            phase.errors.append(repr(e))
        i += 1


async def run_phase(url: str, name: str, clients: int, seconds: float, topic_id: str, tokens: int) -> Phase:
    phase = Phase(name)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.monotonic()
        stop_at = t0 + seconds
        await asyncio.gather(*(client(http, phase, topic_id, tokens, 1000 * c, stop_at) for c in range(clients)))
        phase.seconds = time.monotonic() - t0  # includes the requests still running at the deadline
    return phase


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--start-timeout", type=float, default=1800.0, help="first run builds the index")
    args = parser.parse_args()
    port = free_port()
    proc = start_server(port, args.layer, args.start_timeout)
    url = f"http://127.0.0.1:{port}"
    try:
        r = httpx.post(f"{url}/v1/topics", json={"texts": TOPIC}, timeout=120)
        r.raise_for_status()
        topic_id = r.json()["id"]
        asyncio.run(run_phase(url, "warm-up", 1, 1.0, topic_id, 4))
        sequential = asyncio.run(run_phase(url, "sequential", 1, args.seconds, topic_id, args.tokens))
        concurrent = asyncio.run(run_phase(url, f"{args.clients} clients", args.clients, args.seconds, topic_id,
                                           args.tokens))
        alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    print(sequential.line())
    print(concurrent.line())
    ratio = concurrent.tokens_per_s / sequential.tokens_per_s if sequential.tokens_per_s else float("nan")
    print(f"throughput {args.clients} clients / 1 client: {ratio:.2f}x ({args.tokens} new tokens a request, Swap, "
          f"cpu threads {os.environ.get('OMP_NUM_THREADS', 'default')}); server alive after load: {alive}")
    for e in (sequential.errors + concurrent.errors)[:5]:
        print("error:", e)
    return 0 if alive and not (sequential.errors or concurrent.errors) else 1


if __name__ == "__main__":
    raise SystemExit(main())
