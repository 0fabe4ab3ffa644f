"""The 12-bit entry codes: the pattern survives exactly (escapes included), values within half a level,
the scoring kernel equals the decoded matrix times a vector, and bounds are checked."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from saealign.reference.codec import LEVELS, accumulate, check_codes, column, decode, encode


def random_rows(seed: int = 0, n: int = 50, d: int = 5000) -> sp.csr_matrix:
    """Rows of 0-300 latents over ``d`` ids, values spread over ~5 octaves, with far jumps (> 63 * 64) too."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((n, d))
    for r in range(n):
        k = int(rng.integers(0, 300))
        dense[r, rng.choice(d, size=k, replace=False)] = 2.0 ** rng.uniform(-8, -3, size=k)
    dense[3] = 0
    dense[3, [0, d - 1]] = [0.5, 0.25]  # a jump of d - 1 ids needs several escape codes
    dense[4] = 0
    dense[4, d - 1] = 1.0  # a row whose only entry is far from -1
    return sp.csr_matrix(dense)


def test_pattern_is_exact_and_values_within_half_a_level() -> None:
    m = random_rows()
    packed, code_ptr, lo, step = encode(m.indptr, m.indices, m.data)
    indptr, indices, values = decode(packed, code_ptr, lo, step, m.nnz)
    np.testing.assert_array_equal(indptr, m.indptr)
    np.testing.assert_array_equal(indices, m.indices)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    half = 2.0 ** (step[rows].astype(np.float64) / 2) - 1
    assert np.all(np.abs(values / m.data - 1) <= half + 1e-6)
    # each row's smallest and largest value are range ends: exact up to float32
    for r in np.flatnonzero(np.diff(m.indptr)):
        seg = slice(m.indptr[r], m.indptr[r + 1])
        np.testing.assert_allclose([values[seg].min(), values[seg].max()], [m.data[seg].min(), m.data[seg].max()],
                                   rtol=1e-6)
    assert len(packed) == (code_ptr[-1] + 1) // 2 * 3 and code_ptr[-1] >= m.nnz
    assert (step >= 0).all() and step.max() <= 5.0 / LEVELS + 1e-6


def test_kernel_is_the_decoded_matrix_times_a_vector() -> None:
    m = random_rows(seed=1)
    packed, code_ptr, lo, step = encode(m.indptr, m.indices, m.data)
    indptr, indices, values = decode(packed, code_ptr, lo, step, m.nnz)
    decoded = sp.csr_matrix((values.astype(np.float64), indices, indptr), shape=m.shape)
    x = np.random.default_rng(2).standard_normal(m.shape[0])
    np.testing.assert_allclose(accumulate(packed, code_ptr, lo, step, x, m.shape[1]), decoded.T @ x, rtol=1e-6, atol=1e-6)  # decode rounds to float32
    np.testing.assert_allclose(accumulate(packed, code_ptr, lo, step, x, m.shape[1], binary=True),
                               (decoded > 0).astype(np.float64).T @ x, atol=1e-12)
    latent = int(m.indices[7])
    rows, got = column(packed, code_ptr, lo, step, latent)
    np.testing.assert_array_equal(rows, decoded[:, [latent]].nonzero()[0])
    np.testing.assert_allclose(got, decoded[rows, latent].toarray().ravel(), rtol=1e-6)


def test_bounds_are_checked() -> None:
    m = random_rows(seed=3)
    packed, code_ptr, lo, step = encode(m.indptr, m.indices, m.data)
    counts, bad = check_codes(packed, code_ptr, m.shape[1])
    assert bad == -1 and (counts == np.diff(m.indptr)).all()
    top = int(m.indices.max())
    first_with_top = int(np.flatnonzero(m[:, [top]].toarray().ravel())[0])
    assert check_codes(packed, code_ptr, top)[1] == first_with_top  # one latent too few: that id is out of range
    short = code_ptr.copy()
    short[-1] += 4  # codes beyond the packed bytes
    assert check_codes(packed, short, m.shape[1])[1] == len(code_ptr) - 2
