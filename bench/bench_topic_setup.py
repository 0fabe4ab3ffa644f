"""Time what a new topic costs before its first steered token, on the embedded defaults.

Run: ``python bench/bench_topic_setup.py [--topics 4]`` (needs ``../shared/data`` for the benchmark's topics).

Per topic (30 alignment texts of ``eval steer-bench``'s topics): M1 scoring against the shipped index alone,
the activation contrast (one pass of the model and SAE over the topic texts), and ``strength="auto"``'s
search. Baseline in the same process: one default generation of the search's size (6 neutral prompts x 64
tokens at the default strength), so the ratios hold on any machine. The issue's budget for auto: 5 s a topic
on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

from saealign.defaults import shared_data_dir
from saealign.evaluate.bench_topics import load_bench_topics
from saealign.steering.aligner import Aligner
from saealign.steering.spec import GenerationSpec
from saealign.steering.strength import neutral_prompts

AUTO_BUDGET_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topics", type=int, default=4)
    args = parser.parse_args()
    data = shared_data_dir()
    if data is None:
        raise SystemExit("this benchmark reads the steer-bench topics from ../shared/data: not found")
    aligner = Aligner.default(progress=False)
    assert aligner.index is not None and aligner.embedder is not None
    topics = load_bench_topics(data, 30, 10)[: args.topics]
    prompts = neutral_prompts(6)
    spec = GenerationSpec(max_new_tokens=64)
    aligner.generate(prompts, topics[0].align, spec)  # warm up: basis, probe, first-call overheads
    aligner.neutral_probe(aligner.auto_config)
    rows = []
    for t in topics:
        t0 = time.perf_counter()
        scores = aligner.index.score(t.align, aligner.embedder)
        t1 = time.perf_counter()
        aligner.with_contrast(scores)
        t2 = time.perf_counter()
        choice = aligner.auto_strength(scores, GenerationSpec(strength="auto"))
        t3 = time.perf_counter()
        aligner.generate(prompts, scores, spec)
        t4 = time.perf_counter()
        rows.append((t.name, t1 - t0, t2 - t1, t3 - t2, t4 - t3, choice.strength))
    print("| topic | score (s) | contrast (s) | auto search (s) | one generation 6 x 64 (s) | auto strength |")
    print("|---|---|---|---|---|---|")
    for name, *secs, strength in rows:
        print(f"| {name} | " + " | ".join(f"{s:.2f}" for s in secs) + f" | {strength:.3g} |")
    med = [statistics.median(r[i] for r in rows) for i in range(1, 5)]
    print(f"median: score {med[0]:.2f} s, contrast {med[1]:.2f} s ({med[1] / med[3]:.2f}x one generation), auto "
          f"search {med[2]:.2f} s ({med[2] / med[3]:.2f}x one generation; budget {AUTO_BUDGET_S:.0f} s: "
          f"{'within' if med[2] <= AUTO_BUDGET_S else 'OVER'})")


if __name__ == "__main__":
    main()
