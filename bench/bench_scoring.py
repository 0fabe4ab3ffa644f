"""Time M1 scoring of a 20-text topic against a 100k-prompt reference index.

Run: ``python bench/bench_scoring.py [--prompts 100000] [--nnz 300] [--runs 10]``.

The index is synthetic in its numbers (random sparse summaries with ~300 latents a prompt, as
the default SAE gives on WordNet, and random unit embeddings), compacted into one in-memory shard
as a build would (12-bit codes, int8 embeddings), and scored through the real code path:
``ReferenceIndex.score`` embeds the 20 topic texts with the real MiniLM, computes distances to
every prompt, g and the scores. Baseline in the same process: the same g computed from a dense
``[prompts, latents]`` matrix (what a naive implementation does), on a 10k-prompt slice.
Prints the median per-topic time next to the 0.5 s target and the paper's 62 s, and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import scipy.sparse as sp

from saealign.reference.embed import Embedder
from saealign.reference.index import IndexKeys, ReferenceIndex

TARGET_S = 0.5
PAPER_S = 62.0
TOPIC = [f"The patient with condition {i} was treated with medication and monitored for side effects." for i in range(20)]


def synthetic_index(n_prompts: int, n_latents: int, nnz: int, embedder_key: str, dim: int = 384,
                    seed: int = 0) -> ReferenceIndex:
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, n_latents, size=(n_prompts, 1))
    cols = np.sort((offsets + np.arange(nnz) * (n_latents // nnz)) % n_latents, axis=1).astype(np.int32)
    data = rng.random((n_prompts, nnz), dtype=np.float32) * 5 + 0.1
    indptr = np.arange(n_prompts + 1, dtype=np.int64) * nnz
    act_sum = sp.csr_matrix((data.ravel(), cols.ravel(), indptr), shape=(n_prompts, n_latents))
    emb = rng.standard_normal((n_prompts, dim)).astype(np.float32)
    keys = IndexKeys(model="m", sae="s", layer=0, corpus="c", embedder=embedder_key)
    return ReferenceIndex.from_statistics(act_sum, act_sum.data, np.full(n_prompts, 20, dtype=np.int32), emb,
                                          [""] * n_prompts, ["x"] * n_prompts, keys)


def dense_g(dense: np.ndarray, distances: np.ndarray) -> np.ndarray:
    return (dense * distances[:, None]).sum(axis=0) / np.maximum(dense.sum(axis=0), 1e-30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--nnz", type=int, default=300)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    t0 = time.perf_counter()
    embedder = Embedder.default()
    index = synthetic_index(args.prompts, args.latents, args.nnz, embedder.fingerprint)
    index.score(TOPIC, embedder)  # warm-up: builds the prepared summary once, as a loaded index does
    setup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        index.score(TOPIC, embedder)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)

    # Baseline in the same process: dense g over a 10k-prompt slice, scaled to the full size.
    n_slice = min(10_000, args.prompts)
    sums = index.act_sum[:n_slice]
    summary = (sp.diags(1 / np.asarray(sums.sum(axis=1)).ravel()) @ sums).toarray()
    d = np.random.default_rng(2).random(n_slice).astype(np.float32)
    start = time.perf_counter()
    dense_g(summary, d)
    dense_s = (time.perf_counter() - start) * args.prompts / n_slice
    start = time.perf_counter()
    from saealign.reference.scoring import latent_g, prepare_summary

    latent_g(prepare_summary(sp.csr_matrix(summary)), d)
    sparse_slice_s = time.perf_counter() - start

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"index: {args.prompts} prompts x {args.latents} latents, {int(index.latent_n_prompts.sum())} non-zeros (set-up {setup_s:.1f} s)")
    print(f"score a {len(TOPIC)}-text topic (embed + distances + g + scores): median {median:.3f} s over {args.runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f})")
    print(f"target {TARGET_S} s: ratio target/measured = {TARGET_S / median:.1f}x; paper: {PAPER_S} s per topic "
          f"({PAPER_S / median:.0f}x slower)")
    print(f"baseline (dense g, same process): {dense_s:.3f} s for {args.prompts} prompts (extrapolated from "
          f"{n_slice}); sparse g on the same slice {sparse_slice_s:.4f} s")
    print(f"peak RSS {peak_mib:.0f} MiB")
    return 0 if median <= TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
