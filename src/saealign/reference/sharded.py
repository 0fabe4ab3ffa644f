"""Scoring arithmetic over memory-mapped shards: the summary as one operator, distances from int8.

M1 needs two passes over the reference prompts per topic: the distance of every prompt to the topic,
and one sparse mat-vec ``summary.T @ d``. Both run shard by shard over the mapped files, so a
million-prompt index is scored without being copied into memory (bench/bench_million.py).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from saealign.errors import SaealignError
from saealign.reference.codec import accumulate
from saealign.reference.shards import Shard

CODED_KINDS = ("normalized_sum", "sum", "mean", "binary")
"""Summary kinds a compact index computes (``max`` needs per-token maxima it does not keep)."""


class CodedColumns:
    """``summary.T`` ``[L, P]`` of one summary kind over coded shards; ``self @ x`` is the mat-vec M1 needs.

    ``normalized_sum`` is the stored value ``w``; ``sum`` and ``mean`` scale each prompt's row by its total
    (and 1 / its token count), which folds into ``x``; ``binary`` counts each entry as 1.
    """

    def __init__(self, shards: Sequence[Shard], n_latents: int, kind: str) -> None:
        if kind not in CODED_KINDS:
            raise SaealignError(f"summary {kind!r} needs per-token maxima, which this compact index does not keep: "
                                f"use one of {', '.join(CODED_KINDS)} (docs/scaling.md)")
        self.shards = list(shards)
        self.kind = kind
        self.offsets = np.cumsum([0] + [s.n_prompts for s in self.shards])
        self.shape = (n_latents, int(self.offsets[-1]))
        self.dtype = np.dtype(np.float64)

    def _row_factor(self, s: Shard) -> np.ndarray | None:
        if self.kind == "sum":
            return s.totals.astype(np.float64)
        if self.kind == "mean":
            return s.totals / np.maximum(s.n_tokens, 1).astype(np.float64)
        return None

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        """``[P]`` -> ``[L]`` float64."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.shape[1],):
            raise SaealignError(f"a vector of {x.shape} cannot multiply a summary of {self.shape[1]} prompts")

        def one(k: int) -> np.ndarray:
            s, lo, hi = self.shards[k], self.offsets[k], self.offsets[k + 1]
            factor = self._row_factor(s)
            part = x[lo:hi] if factor is None else x[lo:hi] * factor
            return accumulate(s.packed, s.code_ptr, s.lo, s.step, part, self.shape[0], binary=self.kind == "binary")

        workers = max(1, min(len(self.shards), os.cpu_count() or 1))
        if workers == 1:
            parts = [one(k) for k in range(len(self.shards))]
        else:  # the kernel releases the GIL: one shard a core
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(one, range(len(self.shards))))
        return np.sum(parts, axis=0) if parts else np.zeros(self.shape[0])


def topic_split(topic: np.ndarray) -> tuple[torch.Tensor, float]:
    """Unit topic rows ``[A, D]`` as int8 ``hi`` and ``lo`` parts with ``t ≈ (256 * hi + lo) * s / 256``.

    One scale ``s`` for all rows, and ``lo`` at exactly 1/256 of it, so a prompt's best cosine is found
    in int32 (``256 * hi . q + lo . q``) before any float is made: ~15 bits of each topic coordinate
    (with the int8 reference rows, cosines to ~1e-3, measured in docs/scaling.md).
    Returns the ``[D, 2A padded to 8]`` int8 matrix and ``s``.
    """
    t = np.asarray(topic, dtype=np.float64)
    scale = float(np.abs(t).max()) / 127.0 or 1.0
    hi = np.rint(t / scale)
    lo = np.clip(np.rint((t - hi * scale) / scale * 256.0), -127, 127)
    parts = np.concatenate([hi, lo]).astype(np.int8)  # [2A, D]
    width = -(-parts.shape[0] // 8) * 8  # the int8 kernel wants a multiple of 8 columns
    padded = np.zeros((width, parts.shape[1]), dtype=np.int8)
    padded[: parts.shape[0]] = parts
    return torch.from_numpy(np.ascontiguousarray(padded.T)), scale


def max_cosines(embeddings: np.ndarray, inv_norms: np.ndarray, topic: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """``[n]`` float32: the largest cosine of each int8 reference row to the unit topic rows ``[A, D]``."""
    n_topic = topic.shape[0]
    parts, scale = topic_split(topic)
    best = np.empty(embeddings.shape[0], dtype=np.int32)
    for start in range(0, embeddings.shape[0], chunk):
        with warnings.catch_warnings():  # mapped shards are read-only; the kernel only reads them
            warnings.simplefilter("ignore", UserWarning)
            q = torch.from_numpy(np.asarray(embeddings[start : start + chunk]))
        rows = q.shape[0]
        if rows <= 16:  # _int_mm's CPU kernel needs more than 16 rows: pad small pieces
            q = torch.cat([q, torch.zeros((17 - rows, q.shape[1]), dtype=torch.int8)])
        dots = torch._int_mm(q, parts)[:rows]  # exact int32 dot products
        combined = dots[:, :n_topic].mul(256).add_(dots[:, n_topic : 2 * n_topic])  # |.| < 2^31 for D <= 512
        best[start : start + rows] = combined.amax(dim=1).numpy()
    return best.astype(np.float32) * np.float32(scale / 256.0) * np.asarray(inv_norms, dtype=np.float32)


def distances_from_cosines(cos: np.ndarray, metric: str) -> np.ndarray:
    """Unit vectors: euclidean = ``sqrt(2 - 2 cos)``, cosine distance = ``1 - cos`` (float64)."""
    c = np.clip(cos.astype(np.float64), -1.0, 1.0)
    return 1.0 - c if metric == "cosine" else np.sqrt(np.maximum(0.0, 2.0 - 2.0 * c))
