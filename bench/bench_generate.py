"""Steered vs plain generation speed on the default model, same process.

Run: ``python bench/bench_generate.py [--layer 15] [--tokens 64] [--repeats 2]``.

Plain = no hook at all; Swap = the SAE hook at the layer (encode, edit, decode, contamination
recorded) in the default ``error`` mode; add = the default method, one layer (push + the SAE read of the
pushed residual for contamination) and with the default stack's companion pushes at blocks 6 and 10 (no SAE
pass there: they record nothing). 64 new tokens, top-k 5 sampling, batch 1 and 8. The topic scores are random
(the cost does not depend on their values), with the shipped medical texts for the contrast and the output
match. Prints tokens/s and the overhead ratios (target: steered costs <= 1.10x plain).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from saealign.defaults import DEFAULT_LAYER, TOPICS_DIR, default_companions, resolve_sae
from saealign.models import load_model
from saealign.reference.embed import Embedder
from saealign.reference.scoring import TopicScores
from saealign.steering.aligner import Aligner
from saealign.steering.spec import GenerationSpec

PROMPTS = ["My heart is broken so I should", "The best way to spend a weekend is", "In the morning I usually",
           "The city council decided to", "She opened the letter and", "After the long meeting we",
           "The old house at the end of the street", "When the rain finally stopped"]


def tokens_per_second(aligner: Aligner, batch: int, method: str, topic: TopicScores | None, tokens: int,
                      companion_push: float | None = None) -> float:
    start = time.perf_counter()
    strength = None if method == "add" else 1.0  # add at its default strength, Swap at the paper's
    spec = GenerationSpec(method, strength=strength, max_new_tokens=tokens, top_k=5, companion_push=companion_push)
    gens = aligner.generate(PROMPTS[:batch], topic, spec, seed=0)
    seconds = time.perf_counter() - start
    return sum(len(g.token_ids) for g in gens) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lm = load_model("default")
    sae = resolve_sae(f"default:{args.layer}")
    aligner = Aligner(lm, sae, args.layer, None, Embedder.default(), companions=default_companions(layer=args.layer))
    rng = np.random.default_rng(0)
    d = sae.d_sae
    texts = [t for t in (TOPICS_DIR / "medical.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    topic = aligner.with_contrast(TopicScores(scores=rng.random(d).astype(np.float32), g=rng.random(d),
                                              n_prompts=np.full(d, 100), scored=np.ones(d, dtype=bool),
                                              topic_texts=texts))
    aligner.generate(PROMPTS[:1], spec=GenerationSpec("none", max_new_tokens=4))  # warm-up
    aligner.generate(PROMPTS[:1], topic, GenerationSpec("add", max_new_tokens=4))  # bases, descriptions, contrasts
    rows = [("swap", "swap", None), ("add, one layer", "add", 0.0)]
    if aligner.companions:
        blocks = ", ".join(str(c.aligner.layer) for c in aligner.companions)
        rows.append((f"add + companions (blocks {blocks})", "add", None))
    worst = 0.0
    for batch in (1, 8):
        speeds: dict[str, list[float]] = {"plain": [], **{name: [] for name, _, _ in rows}}
        for _ in range(args.repeats):  # interleaved so drifts of the machine hit every row alike
            speeds["plain"].append(tokens_per_second(aligner, batch, "none", None, args.tokens))
            for name, method, push in rows:
                speeds[name].append(tokens_per_second(aligner, batch, method, topic, args.tokens, push))
        p = max(speeds["plain"])
        for name, _, _ in rows:
            s = max(speeds[name])
            ratio = p / s
            worst = max(worst, ratio)
            print(f"batch {batch}: plain {p:.1f} tok/s, {name} {s:.1f} tok/s -> steered costs {ratio:.3f}x plain "
                  f"({(ratio - 1) * 100:+.1f} %)")
    print(f"layer {args.layer}, {args.tokens} new tokens, dtype {next(lm.model.parameters()).dtype}; target <= 1.10x")
    return 0 if worst <= 1.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
