"""Scoring arithmetic over memory-mapped shards: the summary as one operator, distances from int8.

M1 needs two passes over the reference prompts per topic: the distance of every prompt to the topic,
and one sparse mat-vec ``summary.T @ d``. Both run shard by shard over the mapped files, so a
million-prompt index is scored without being copied into memory (bench/bench_million.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

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
        out = np.zeros(self.shape[0], dtype=np.float64)
        for s, lo, hi in zip(self.shards, self.offsets[:-1], self.offsets[1:], strict=True):
            factor = self._row_factor(s)
            part = x[lo:hi] if factor is None else x[lo:hi] * factor
            out += accumulate(s.packed, s.code_ptr, s.lo, s.step, part, self.shape[0], binary=self.kind == "binary")
        return out


def topic_split(topic: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Unit topic rows ``[A, D]`` as two int8 parts, ``t ≈ hi * s_hi + lo * s_lo``.

    With the int8 reference rows this gives exact int32 dot products, and the two parts together
    carry ~14 bits of each topic coordinate (cosine error ~1e-5, measured in tests/test_sharded.py).
    Returns the ``[D, 2A padded to 8]`` int8 matrix and the ``[2A]`` scales.
    """
    t = np.asarray(topic, dtype=np.float64)
    s_hi = np.abs(t).max(axis=1) / 127.0
    s_hi[s_hi == 0] = 1.0
    hi = np.rint(t / s_hi[:, None])
    rest = t - hi * s_hi[:, None]
    s_lo = np.abs(rest).max(axis=1) / 127.0
    s_lo[s_lo == 0] = 1.0
    lo = np.rint(rest / s_lo[:, None])
    parts = np.concatenate([hi, lo]).astype(np.int8)  # [2A, D]
    width = -(-parts.shape[0] // 8) * 8  # the int8 kernel wants a multiple of 8 columns
    padded = np.zeros((width, parts.shape[1]), dtype=np.int8)
    padded[: parts.shape[0]] = parts
    return torch.from_numpy(np.ascontiguousarray(padded.T)), np.concatenate([s_hi, s_lo])


def max_cosines(embeddings: np.ndarray, inv_norms: np.ndarray, topic: np.ndarray, chunk: int = 131072) -> np.ndarray:
    """``[n]`` float32: the largest cosine of each int8 reference row to the unit topic rows ``[A, D]``."""
    n_topic = topic.shape[0]
    parts, scales = topic_split(topic)
    s_hi = torch.from_numpy(scales[:n_topic].astype(np.float32))
    s_lo = torch.from_numpy(scales[n_topic:].astype(np.float32))
    out = np.empty(embeddings.shape[0], dtype=np.float32)
    for start in range(0, embeddings.shape[0], chunk):
        with warnings.catch_warnings():  # mapped shards are read-only; the kernel only reads them
            warnings.simplefilter("ignore", UserWarning)
            q = torch.from_numpy(np.asarray(embeddings[start : start + chunk]))
        if q.shape[0] <= 16:  # _int_mm's CPU kernel needs more than 16 rows: pad small pieces
            q = torch.cat([q, torch.zeros((17 - q.shape[0], q.shape[1]), dtype=torch.int8)])
        dots = torch._int_mm(q, parts)[: min(chunk, embeddings.shape[0] - start)].float()
        cos = dots[:, :n_topic] * s_hi + dots[:, n_topic : 2 * n_topic] * s_lo
        out[start : start + chunk] = cos.amax(dim=1).numpy()
    return out * np.asarray(inv_norms, dtype=np.float32)


def distances_from_cosines(cos: np.ndarray, metric: str) -> np.ndarray:
    """Unit vectors: euclidean = ``sqrt(2 - 2 cos)``, cosine distance = ``1 - cos`` (float64)."""
    c = np.clip(cos.astype(np.float64), -1.0, 1.0)
    return 1.0 - c if metric == "cosine" else np.sqrt(np.maximum(0.0, 2.0 - 2.0 * c))
