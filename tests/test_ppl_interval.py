"""The perplexity ratio's bootstrap interval: exact where nothing can vary, the shared denominator's noise in it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saealign.evaluate.ppl_interval import ppl_interval_columns, ppl_ratio_interval


def _cells(rng: np.random.Generator, topics: int, seeds: int, openers: int, scale: float) -> list[tuple[list[float], list[int]]]:
    tokens = rng.integers(20, 48, size=(topics, seeds * openers))
    nll = tokens * (2.3 + scale * rng.standard_normal((topics, seeds * openers)))
    return [(list(map(float, n)), list(map(int, t))) for n, t in zip(nll, tokens, strict=True)]


def _point(row: list[tuple[list[float], list[int]]], base: list[tuple[list[float], list[int]]]) -> float:
    logs = [sum(r[0]) / sum(r[1]) - sum(b[0]) / sum(b[1]) for r, b in zip(row, base, strict=True)]
    return math.exp(float(np.mean(logs)))


def test_one_seed_leaves_nothing_to_redraw() -> None:
    rng = np.random.default_rng(0)
    row, base = _cells(rng, 3, 1, 8, 0.3), _cells(rng, 3, 1, 8, 0.3)
    low, high = ppl_ratio_interval(row, base, n_openers=8, resamples=50)
    assert low == pytest.approx(_point(row, base), rel=1e-12) and high == pytest.approx(low, rel=1e-12)


def test_equal_texts_per_opener_give_the_point_itself() -> None:
    # every seed of an opener scored alike: each redraw sums the same numbers
    row = [([2.0, 3.0, 2.0, 3.0], [10, 10, 10, 10])]
    base = [([1.0, 4.0, 1.0, 4.0], [10, 12, 10, 12])]
    low, high = ppl_ratio_interval(row, base, n_openers=2, resamples=50)
    assert low == pytest.approx(_point(row, base), rel=1e-12) and high == pytest.approx(low, rel=1e-12)


def test_the_interval_holds_the_point_is_deterministic_and_narrows_with_seeds() -> None:
    rng = np.random.default_rng(1)
    row, base = _cells(rng, 4, 4, 8, 0.4), _cells(rng, 4, 4, 8, 0.4)
    low, high = ppl_ratio_interval(row, base, n_openers=8)
    assert low < _point(row, base) < high
    assert ppl_ratio_interval(row, base, n_openers=8) == (low, high)
    big_row, big_base = _cells(rng, 4, 32, 8, 0.4), _cells(rng, 4, 32, 8, 0.4)
    big_low, big_high = ppl_ratio_interval(big_row, big_base, n_openers=8)
    assert big_high - big_low < (high - low) / 2  # 8x the seeds: about a third of the width


def test_the_shared_denominator_is_not_averaged_away_over_topics() -> None:
    # twelve topics whose rows are exact, over one noisy unsteered sample: the whole width is the denominator's
    rng = np.random.default_rng(2)
    one_base = _cells(rng, 1, 4, 8, 0.5)[0]
    exact = [([2.3 * t for t in one_base[1]], list(one_base[1]))] * 12
    low, high = ppl_ratio_interval(exact, [one_base] * 12, n_openers=8)
    single_low, single_high = ppl_ratio_interval(exact[:1], [one_base], n_openers=8)
    assert high - low == pytest.approx(single_high - single_low, rel=0.25)  # 12 topics do not shrink it


def test_columns_only_where_every_cell_kept_its_texts() -> None:
    rng = np.random.default_rng(3)
    row, base = _cells(rng, 2, 2, 4, 0.3), _cells(rng, 2, 2, 4, 0.3)
    cols = ppl_interval_columns(row, base, 4)
    assert set(cols) == {"ppl_ratio_low", "ppl_ratio_high"} and cols["ppl_ratio_low"] < cols["ppl_ratio_high"]
    assert ppl_interval_columns([([], [])] * 2, base, 4) == {} and ppl_interval_columns(row, base, None) == {}
    with pytest.raises(ValueError, match="whole numbers of seeds"):
        ppl_ratio_interval(row, base, n_openers=3)


def test_an_unsteered_row_on_more_seeds_is_redrawn_over_its_own() -> None:
    # the unsteered row on 4 seeds where the row has 1: still exact when nothing varies within an opener...
    row = [([2.0, 3.0], [10, 10])]
    base = [([1.0, 4.0] * 4, [10, 12] * 4)]
    low, high = ppl_ratio_interval(row, base, n_openers=2, resamples=50)
    assert low == pytest.approx(_point(row, base), rel=1e-12) and high == pytest.approx(low, rel=1e-12)
    # ...and a denominator on 8x the seeds narrows an interval that only the denominator widens
    rng = np.random.default_rng(3)
    few, many = _cells(rng, 1, 4, 8, 0.5)[0], _cells(rng, 1, 32, 8, 0.5)[0]
    exact = [([2.3 * t for t in few[1]], list(few[1]))]
    narrow = ppl_ratio_interval(exact, [many], n_openers=8)
    wide = ppl_ratio_interval(exact, [few], n_openers=8)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2
    with pytest.raises(ValueError, match="whole numbers of seeds"):
        ppl_ratio_interval(exact, [(many[0][:-1], many[1][:-1])], n_openers=8)
