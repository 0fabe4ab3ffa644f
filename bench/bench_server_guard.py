"""Does a new topic's strength search stall other clients, and how much memory does the worst request take?

Run: ``python bench/bench_server_guard.py [--corpus SPEC] [--index-prompts 400] [--probe-tokens 2]``.

Starts ``saealign serve`` (the default model and SAE, an index of ``--index-prompts`` prompts of
``--corpus``, built once and cached) as a separate process on a free loopback port, then:

1. **known topic**: scores topic A and runs its ``strength=auto`` search once (the topic is now known),
   then times ``--repeats`` requests for A (``--probe-tokens`` new tokens) one after the other;
2. **during a search**: sends one ``strength=auto`` request for a NEW topic B (its search starts) and,
   while it runs, keeps timing requests for A; reports their latencies and B's own;
3. **worst request**: one request at the server's per-request token budget (``--worst-rows`` rows of
   the longest prompt the budget allows); reports the idle server's RSS and its peak during the request
   (RSS of the server process and its children, sampled every 20 ms).

Prints one JSON object. Exit status 1 when a request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

TOPIC_A = ["The patient was diagnosed with type 2 diabetes and started on metformin.",
           "Symptoms of influenza include fever, cough, sore throat and muscle aches.",
           "Hypertension raises the risk of stroke, heart attack and kidney disease."]
TOPIC_B = ["The striker scored twice in the second half to win the cup final.",
           "The marathon runner crossed the finish line in just over two hours.",
           "The coach changed the team's defence before the championship game."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeakRss:
    """Samples a process tree's resident memory every 20 ms in a thread; ``peak`` is the largest seen (bytes)."""

    def __init__(self, pid: int) -> None:
        self.proc, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            time.sleep(0.02)

    def reset(self) -> int:
        before, self.peak = self.peak, 0
        return before


def timed(client: httpx.Client, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    r = client.post("/v1/generate", json=body)
    seconds = time.perf_counter() - start
    if r.status_code != 200:
        raise SystemExit(f"request failed: {r.status_code} {r.text[:300]}")
    return seconds, r.json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="../shared/data/reference/wordnet.jsonl.gz")
    ap.add_argument("--index-prompts", type=int, default=400)
    ap.add_argument("--probe-tokens", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worst-rows", type=int, default=1)
    ap.add_argument("--serve-args", default="", help="extra options for saealign serve")
    args = ap.parse_args()

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "saealign"), "serve", "--port", str(port), "--corpus", args.corpus,
           "--max-prompts", str(args.index_prompts), *args.serve_args.split()]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    out: dict = {"command": " ".join(cmd[1:])}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            deadline = time.monotonic() + 1800
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:] if server.stderr else ''}")
                time.sleep(0.5)
            rss = PeakRss(server.pid)
            probe = {"prompt": "The weather today is", "topic": TOPIC_A, "max_new_tokens": args.probe_tokens,
                     "greedy": True}
            out["first_search_s"] = round(timed(client, probe)[0], 2)  # scores A and searches its strength
            alone = [timed(client, probe)[0] for _ in range(args.repeats)]
            out["known_topic_alone_s"] = {"median": round(statistics.median(alone), 3), "max": round(max(alone), 3)}

            during: list[float] = []
            new_topic: dict = {}

            def search_b() -> None:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c2:
                    new_topic["seconds"], new_topic["answer"] = timed(
                        c2, {**probe, "topic": TOPIC_B, "prompt": "My favourite thing is"})

            thread = threading.Thread(target=search_b)
            thread.start()
            time.sleep(0.5)  # B's search is under way
            while thread.is_alive():
                during.append(timed(client, probe)[0])
            thread.join()
            out["known_topic_during_search_s"] = {"n": len(during), "median": round(statistics.median(during), 3),
                                                  "max": round(max(during), 3)}
            out["new_topic_request_s"] = round(new_topic["seconds"], 2)
            out["new_topic_strength_used"] = new_topic["answer"]["generations"][0]["strength"]

            limits = client.get("/health").json().get("limits", {})
            budget = limits.get("max_request_tokens")
            new = 64
            # the longest prompt the budget allows (or a long one where the server has no budget)
            words = max(16, ((budget // max(1, args.worst_rows)) - new - 8) if budget else 3000)
            long_prompt = " ".join(["the"] * words)
            out["peak_rss_before_worst_mb"] = round(rss.reset() / 2**20)
            time.sleep(0.1)
            out["rss_idle_before_worst_mb"] = round(rss.peak / 2**20)  # sampled since the reset: the idle server
            worst = {"prompts": [long_prompt] * args.worst_rows, "max_new_tokens": new, "method": "none",
                     "greedy": True}
            out["worst_request"] = {"rows": args.worst_rows, "prompt_words": words, "max_new_tokens": new,
                                    "budget": budget}
            out["worst_request_s"] = round(timed(client, worst)[0], 2)
            time.sleep(0.2)
            out["peak_rss_worst_mb"] = round(rss.peak / 2**20)
            rss.running = False
    finally:
        server.terminate()
        server.wait(30)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
