"""A bootstrap interval for the steering benchmark's perplexity ratio, with the unsteered row's noise in it.

The ratio of a row is a geometric mean over topics of ``ppl(row's continuations) / ppl(unsteered continuations)``.
Its noise has two parts, and the second is the one a per-topic error bar misses: the row's own sample, and the
unsteered sample in the denominator, which is *one* sample shared by every topic, so its draw moves all the topics'
ratios of a run together (run 12's 32 unsteered seeds, in 4-seed blocks, read about ± 6 %, docs/results.md).

Each replicate redraws, for every opener, as many continuations as there are seeds from that opener's own (openers
are fixed, seeds are the random part): once for the unsteered row (over its own seeds, which may be more than the
row's), the same draw for every topic, and independently per topic for the row itself. The interval is the replicates' central ``level`` share; deterministic (a fixed seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000


def _draw(rng: np.random.Generator, n_texts: int, n_openers: int) -> np.ndarray:
    """Indices of one stratified redraw: text ``i`` came from opener ``i % n_openers`` (seeds outer, openers inner)."""
    seeds = n_texts // n_openers
    return (rng.integers(0, seeds, size=(seeds, n_openers)) * n_openers + np.arange(n_openers)).ravel()


def ppl_ratio_interval(row: Sequence[tuple[Sequence[float], Sequence[int]]],
                       base: Sequence[tuple[Sequence[float], Sequence[int]]], n_openers: int,
                       level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """``(low, high)`` of the geometric-mean perplexity ratio of ``row`` over ``base``, topic by topic.

    ``row[t]`` and ``base[t]`` are topic t's per-continuation judge NLL (nats) and token counts, in the benchmark's
    order (seeds outer, openers inner), each a whole number of seeds x ``n_openers`` (the unsteered row may be sampled
    on more seeds than the row: each is redrawn over its own)."""
    if not row or len(row) != len(base):
        raise ValueError("one (nll, tokens) pair per topic, for the row and the unsteered row alike")
    nll = np.array([r[0] for r in row], dtype=np.float64)
    tok = np.array([r[1] for r in row], dtype=np.float64)
    base_nll = np.array([b[0] for b in base], dtype=np.float64)
    base_tok = np.array([b[1] for b in base], dtype=np.float64)
    n_texts, n_base = nll.shape[1], base_nll.shape[1]
    if (n_openers < 1 or n_texts % n_openers or n_base % n_openers or tok.shape != nll.shape
            or base_tok.shape != base_nll.shape or base_nll.shape[0] != nll.shape[0]):
        raise ValueError(f"{n_texts} and {n_base} continuations per topic are not whole numbers of seeds x {n_openers} "
                         "openers")
    rng = np.random.default_rng(seed)
    logs = np.empty(resamples)
    topics = np.arange(nll.shape[0])[:, None]
    for r in range(resamples):
        shared = _draw(rng, n_base, n_openers)
        own = np.stack([_draw(rng, n_texts, n_openers) for _ in range(nll.shape[0])])
        log_row = nll[topics, own].sum(1) / tok[topics, own].sum(1)
        log_base = base_nll[:, shared].sum(1) / base_tok[:, shared].sum(1)
        logs[r] = np.mean(log_row - log_base)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(logs, [tail, 100 - tail])
    return float(np.exp(low)), float(np.exp(high))


def ppl_interval_columns(row: Sequence[tuple[Sequence[float], Sequence[int]]], base: Sequence[tuple[Sequence[float], Sequence[int]]],
                         n_openers: int | None) -> dict[str, float]:
    """``ppl_ratio_low`` / ``ppl_ratio_high`` (95 %) where every cell of the row and of ``none`` has its
    per-continuation NLLs (runs before they were kept have none: no columns)."""
    if (not n_openers or not row or len(base) != len(row)
            or not all(r[0] and b[0] for r, b in zip(row, base, strict=True))):
        return {}
    low, high = ppl_ratio_interval(row, base, n_openers)
    return {"ppl_ratio_low": low, "ppl_ratio_high": high}
