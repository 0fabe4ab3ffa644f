"""Time M1 scoring of one topic against a synthetic reference index (100k prompts x 4608 latents).

Run: ``python bench/bench_scoring.py [--prompts 100000] [--latents 4608] [--nnz 200] [--runs 20]``.
Prints the one-off preparation time, the median per-topic time (latent_g + scores_from_g) next to
the 0.5 s target, and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import scipy.sparse as sp

from saealign.scoring import latent_g, prepare_summary, scores_from_g

TARGET_S = 0.5


def synthetic_summary(n_prompts: int, n_latents: int, nnz: int, seed: int = 0) -> sp.csr_matrix:
    """``[P, L]`` float32 CSR, ``nnz`` distinct latents per row, rows summing to 1 (like the index)."""
    rng = np.random.default_rng(seed)
    # Distinct latents per row: a random offset plus a fixed stride pattern, sorted.
    offsets = rng.integers(0, n_latents, size=(n_prompts, 1))
    cols = np.sort((offsets + np.arange(nnz) * (n_latents // nnz)) % n_latents, axis=1).astype(np.int32)
    data = rng.random((n_prompts, nnz), dtype=np.float32)
    data /= data.sum(axis=1, keepdims=True)
    indptr = np.arange(n_prompts + 1, dtype=np.int64) * nnz
    return sp.csr_matrix((data.ravel(), cols.ravel(), indptr), shape=(n_prompts, n_latents))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--nnz", type=int, default=200, help="non-zeros per prompt")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    summary = synthetic_summary(args.prompts, args.latents, args.nnz)
    t0 = time.perf_counter()
    prepared = prepare_summary(summary)
    prep_s = time.perf_counter() - t0

    rng = np.random.default_rng(1)
    times = []
    for _ in range(args.runs):
        d = rng.random(args.prompts) * 1.5  # a new topic each run
        t0 = time.perf_counter()
        g, _, n_prompts = latent_g(prepared, d)
        scores_from_g(g, n_prompts, min_prompts=20)
        times.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    g_raw, _, n_raw = latent_g(summary, d)
    scores_from_g(g_raw, n_raw, min_prompts=20)
    raw_s = time.perf_counter() - t0

    median = float(np.median(times))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"index: {args.prompts} prompts x {args.latents} latents, {summary.nnz:,} non-zeros (float32)")
    print(f"prepare_summary (once per index): {prep_s:.3f} s")
    print(f"per topic, prepared: median {median:.4f} s over {args.runs} runs (target < {TARGET_S} s)")
    print(f"per topic, unprepared summary: {raw_s:.3f} s")
    print(f"peak RSS: {peak_mib:.0f} MiB")
    return 0 if median < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
