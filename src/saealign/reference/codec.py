"""The compact prompt summaries: every (prompt, latent) entry in 12 bits, and the kernels that read them.

A prompt's summary (normalised sum over its ~300 firing latents, for the default SAE) is stored as a
run of 12-bit codes, two codes in three bytes. A code is ``gap << 6 | level``:

- ``gap`` 1..63: the next firing latent is the previous one + gap (the first counts from -1), and
  ``level`` 0..63 is its summary value on a log scale spanning the prompt's own range,
  ``w = 2 ** (lo + level * step)`` (``lo``, ``step`` stored per prompt);
- ``gap`` 0: no entry, the latent id jumps by ``63 * (level + 1)`` (rare: latents are ~15 apart).

So the sparsity pattern is exact and each value is kept to within ±3 % (half a level of a ~4-octave
range): the measured effect on scores is in docs/scaling.md. Scoring never unpacks the codes into
arrays: :func:`accumulate` walks them (numba; the shards run on threads) and adds ``x[p] * w`` to each
latent, which is ``summary.T @ x``, at ~1.5 bytes an entry in memory as on disk.
"""

from __future__ import annotations

import numba
import numpy as np

LEVELS = 63
"""Largest level: values are quantised to 64 steps of each prompt's own log range."""


def encode(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                              np.ndarray]:
    """CSR rows (sorted latent ids, positive values) -> ``(packed uint8, code_ptr int64 [n+1], lo f32 [n], step f32 [n])``."""
    n = len(indptr) - 1
    logs = np.log2(np.maximum(values.astype(np.float64), np.finfo(np.float64).tiny))
    lo = np.zeros(n, dtype=np.float32)
    step = np.zeros(n, dtype=np.float32)
    rows = np.flatnonzero(np.diff(indptr) > 0)
    if len(rows):
        lo[rows] = np.minimum.reduceat(logs, indptr[rows]).astype(np.float32)
        hi = np.maximum.reduceat(logs, indptr[rows])
        step[rows] = ((hi - lo[rows]) / LEVELS).astype(np.float32)
    codes, code_ptr = _codes(np.asarray(indptr, np.int64), np.asarray(indices, np.int64), logs, lo, step)
    return _pack(codes), code_ptr, lo, step


@numba.njit(cache=True)
def _codes(indptr, indices, logs, lo, step):
    n = len(indptr) - 1
    codes = np.empty(len(indices) * 2 + n * 2 + 8, dtype=np.uint16)  # escapes are rare; bounded generously below
    code_ptr = np.zeros(n + 1, dtype=np.int64)
    c = 0
    for p in range(n):
        prev = -1
        for e in range(indptr[p], indptr[p + 1]):
            gap = indices[e] - prev
            while gap > 63:  # jump by 63 * (k + 1), k <= 63, until the rest fits a gap code
                k = min((gap - 1) // 63, 64) - 1
                if c >= len(codes):
                    codes = np.concatenate((codes, np.empty(len(codes), dtype=np.uint16)))
                codes[c] = k
                c += 1
                gap -= 63 * (k + 1)
            level = 0
            if step[p] > 0:
                level = int(np.rint((logs[e] - lo[p]) / step[p]))
                level = min(max(level, 0), LEVELS)
            if c >= len(codes):
                codes = np.concatenate((codes, np.empty(len(codes), dtype=np.uint16)))
            codes[c] = (gap << 6) | level
            c += 1
            prev = indices[e]
        code_ptr[p + 1] = c
    return codes[:c], code_ptr


def _pack(codes: np.ndarray) -> np.ndarray:
    """12-bit codes -> bytes, two codes in three (little-endian nibbles)."""
    c = np.zeros(len(codes) + (len(codes) & 1), dtype=np.uint16)
    c[: len(codes)] = codes
    even, odd = c[0::2], c[1::2]
    out = np.empty((len(even), 3), dtype=np.uint8)
    out[:, 0] = even & 0xFF
    out[:, 1] = ((even >> 8) & 0x0F) | ((odd & 0x0F) << 4)
    out[:, 2] = odd >> 4
    return out.ravel()


@numba.njit(inline="always")
def _code(packed, i):
    base = (i >> 1) * 3
    if i & 1:
        return (np.int64(packed[base + 1]) >> 4) | (np.int64(packed[base + 2]) << 4)
    return np.int64(packed[base]) | ((np.int64(packed[base + 1]) & 0x0F) << 8)


@numba.njit(inline="always")
def _step(acc, table, code, latent):
    gap = code >> 6
    if gap == 0:
        return latent + 63 * ((code & 63) + 1)
    latent += gap
    acc[latent] += table[code & 63]
    return latent


@numba.njit(nogil=True, cache=True)
def _accumulate(packed, code_ptr, lo, step, x, binary, n_latents):
    acc = np.zeros(n_latents)
    table = np.empty(LEVELS + 1)
    for p in range(len(code_ptr) - 1):
        xp = x[p]
        if xp == 0.0:
            continue
        if binary:
            for j in range(LEVELS + 1):
                table[j] = xp
        else:  # table[level] = x[p] * w(level): one multiply a level, none an entry
            table[0] = xp * 2.0 ** lo[p]
            ratio = 2.0 ** step[p]
            for j in range(1, LEVELS + 1):
                table[j] = table[j - 1] * ratio
        latent = -1
        i, end = code_ptr[p], code_ptr[p + 1]
        if i < end and i & 1:  # a row may start on the second code of a byte triple
            latent = _step(acc, table, _code(packed, i), latent)
            i += 1
        while i + 1 < end:  # then whole triples: two codes from three bytes
            base = (i >> 1) * 3
            b1 = np.int64(packed[base + 1])
            latent = _step(acc, table, np.int64(packed[base]) | ((b1 & 0x0F) << 8), latent)
            latent = _step(acc, table, (b1 >> 4) | (np.int64(packed[base + 2]) << 4), latent)
            i += 2
        if i < end:
            latent = _step(acc, table, _code(packed, i), latent)
    return acc


def accumulate(packed: np.ndarray, code_ptr: np.ndarray, lo: np.ndarray, step: np.ndarray, x: np.ndarray,
               n_latents: int, binary: bool = False) -> np.ndarray:
    """``summary.T @ x``: ``[L]`` float64 with ``summary[p, i] = w`` (or 1 where ``binary``), ``x`` ``[n]``.

    Releases the GIL, so callers run shards on threads (:class:`~saealign.reference.sharded.CodedColumns`):
    no numba threading layer, hence safe to call from several threads at once (the server does).
    """
    return _accumulate(packed, code_ptr, lo, step, np.asarray(x, dtype=np.float64), binary, n_latents)


@numba.njit(cache=True)
def _decode(packed, code_ptr, lo, step, n_entries):
    n = len(code_ptr) - 1
    indptr = np.zeros(n + 1, dtype=np.int64)
    indices = np.empty(n_entries, dtype=np.int32)
    values = np.empty(n_entries, dtype=np.float32)
    e = 0
    for p in range(n):
        latent = -1
        for i in range(code_ptr[p], code_ptr[p + 1]):
            code = _code(packed, i)
            gap = code >> 6
            if gap == 0:
                latent += 63 * ((code & 63) + 1)
            else:
                latent += gap
                indices[e] = latent
                values[e] = 2.0 ** (lo[p] + step[p] * (code & 63))
                e += 1
        indptr[p + 1] = e
    return indptr, indices, values


def decode(packed: np.ndarray, code_ptr: np.ndarray, lo: np.ndarray, step: np.ndarray, n_entries: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR ``(indptr int64, indices int32, values float32)`` the codes stand for (for inspection and tests)."""
    return _decode(packed, code_ptr, lo, step, n_entries)


@numba.njit(cache=True)
def _column(packed, code_ptr, lo, step, latent):
    rows = []
    values = []
    for p in range(len(code_ptr) - 1):
        at = -1
        for i in range(code_ptr[p], code_ptr[p + 1]):
            code = _code(packed, i)
            gap = code >> 6
            at += 63 * ((code & 63) + 1) if gap == 0 else gap
            if at >= latent:
                if at == latent and gap:
                    rows.append(p)
                    values.append(2.0 ** (lo[p] + step[p] * (code & 63)))
                break  # ids only grow within a row
    return np.array(rows, dtype=np.int64), np.array(values, dtype=np.float64)


def column(packed: np.ndarray, code_ptr: np.ndarray, lo: np.ndarray, step: np.ndarray, latent: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The prompts (rows) where ``latent`` fires and its summary value there: one pass over the codes."""
    rows, values = _column(packed, code_ptr, lo, step, int(latent))
    return rows, values


@numba.njit(cache=True)
def check_codes(packed, code_ptr, n_latents):
    """Entries counted per row, or -1 if a code leads outside ``[0, n_latents)``: run before any scoring."""
    n = len(code_ptr) - 1
    counts = np.zeros(n, dtype=np.int64)
    for p in range(n):
        if code_ptr[p + 1] < code_ptr[p] or (code_ptr[p + 1] + 1) // 2 * 3 > len(packed):
            return counts, p
        latent = -1
        for i in range(code_ptr[p], code_ptr[p + 1]):
            code = _code(packed, i)
            gap = code >> 6
            latent += 63 * ((code & 63) + 1) if gap == 0 else gap
            if latent >= n_latents:
                return counts, p
            if gap:
                counts[p] += 1
    return counts, -1
