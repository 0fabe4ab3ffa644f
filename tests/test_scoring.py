"""M1 scoring: hand-computed g and scores, summary kinds, masking, persistence, Kendall tau."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from saealign.errors import SaealignError
from saealign.reference.embed import min_distances
from saealign.reference.scoring import (
    SUMMARIES,
    TopicScores,
    kendall_tau,
    latent_g,
    prepare_summary,
    score_topic,
    scores_from_g,
    summary_matrix,
)

# 4 prompts x 3 latents, a summary whose rows sum to 1, and distances chosen for easy fractions.
HAND_SUMMARY = np.array(
    [
        [0.5, 0.5, 0.0],
        [1.0, 0.0, 0.0],
        [0.0, 0.5, 0.5],
        [0.0, 0.0, 1.0],
    ],
    dtype=np.float32,
)
HAND_D = np.array([0.0, 1.0, 2.0, 4.0])


def test_latent_g_by_hand() -> None:
    g, weight, n_prompts = latent_g(sp.csr_matrix(HAND_SUMMARY), HAND_D)
    # g0 = (0.5*0 + 1*1)/1.5; g1 = (0.5*0 + 0.5*2)/1.0; g2 = (0.5*2 + 1*4)/1.5
    np.testing.assert_allclose(g, [2 / 3, 1.0, 10 / 3], rtol=1e-7)
    np.testing.assert_allclose(weight, [1.5, 1.0, 1.5])
    np.testing.assert_array_equal(n_prompts, [2, 2, 2])
    scores, scored, note = scores_from_g(g, n_prompts, min_prompts=1)
    # (max g - g)/(max g - min g): 1, (10/3 - 1)/(8/3) = 7/8, 0
    np.testing.assert_allclose(scores, [1.0, 7 / 8, 0.0], rtol=1e-6)
    assert scored.all() and note is None and scores.dtype == np.float32


def test_prepared_equals_raw_and_float64_truth() -> None:
    rng = np.random.default_rng(0)
    dense = rng.random((500, 40)) * (rng.random((500, 40)) < 0.2)
    s32 = sp.csr_matrix(dense.astype(np.float32))
    d = rng.random(500) + 0.5
    g_raw, w_raw, n_raw = latent_g(s32, d)
    g_prep, w_prep, n_prep = latent_g(prepare_summary(s32), d)
    np.testing.assert_array_equal(g_raw, g_prep)
    np.testing.assert_array_equal(n_raw, n_prep)
    np.testing.assert_array_equal(w_raw, w_prep)
    d32 = dense.astype(np.float32).astype(np.float64)
    truth = (d32.T @ d) / d32.sum(axis=0)
    np.testing.assert_allclose(g_raw, truth, rtol=1e-6)
    np.testing.assert_array_equal(n_raw, (dense > 0).sum(axis=0))


def test_relevancy_direction() -> None:
    # Latent 0 fires only on the close prompts, latent 2 only on the far ones, latent 1 on all.
    s = np.zeros((40, 3), dtype=np.float32)
    s[:20, 0] = 1.0
    s[20:, 2] = 1.0
    s[:, 1] = 0.5
    d = np.r_[np.full(20, 0.1), np.full(20, 1.5)]
    ts = score_topic(sp.csr_matrix(s), d, min_prompts=20)
    assert ts.scores[0] == 1.0 and ts.scores[2] == 0.0
    assert 0.0 < ts.scores[1] < 1.0
    assert ts.top(3) == [0, 1, 2]


def test_min_prompts_masks_rare_latents() -> None:
    s = np.zeros((30, 3), dtype=np.float32)
    s[:25, 0] = 1.0
    s[25:, 1] = 1.0  # fires on only 5 prompts, all at distance 0: would be the best if scored
    s[:, 2] = 1.0
    d = np.r_[np.full(25, 1.0), np.zeros(5)]
    d[:10] = 3.0
    ts = score_topic(sp.csr_matrix(s), d, min_prompts=20)
    np.testing.assert_array_equal(ts.scored, [True, False, True])
    np.testing.assert_array_equal(ts.n_prompts, [25, 5, 30])
    assert ts.scores[1] == 0.0
    assert 1 not in ts.top(10) and ts.top(10) == [2, 0]


def test_never_firing_latent_has_nan_g_and_is_unscored() -> None:
    s = np.zeros((25, 2), dtype=np.float32)
    s[:, 0] = 1.0
    ts = score_topic(sp.csr_matrix(s), np.linspace(0, 1, 25), min_prompts=20)
    assert np.isnan(ts.g[1]) and not ts.scored[1] and ts.scores[1] == 0.0
    assert ts.scores[0] == 1.0 and ts.note is not None  # one scored latent: flat by definition


def test_flat_g_note() -> None:
    s = sp.csr_matrix(np.ones((20, 4), dtype=np.float32))
    ts = score_topic(s, np.full(20, 0.7), min_prompts=20)
    np.testing.assert_array_equal(ts.scores, np.ones(4, dtype=np.float32))
    assert ts.note == "all scored latents are equally far from the topic: scores are flat"


def test_no_scored_latent_error() -> None:
    with pytest.raises(SaealignError, match=r"no latent fires on >= 20 reference prompts \(best: 7\): build"):
        scores_from_g(np.zeros(3), np.array([7, 2, 0]), min_prompts=20)
    with pytest.raises(SaealignError, match="min_prompts"):
        scores_from_g(np.zeros(3), np.array([7, 2, 0]), min_prompts=0)


def test_nan_inputs_raise() -> None:
    s = sp.csr_matrix(HAND_SUMMARY)
    d = HAND_D.copy()
    d[2] = np.nan
    with pytest.raises(SaealignError, match=r"1 distances are NaN or inf \(first at prompt 2\)"):
        latent_g(s, d)
    with pytest.raises(SaealignError, match="distances have shape"):
        latent_g(s, HAND_D[:3])
    with pytest.raises(SaealignError, match="NaN/inf g"):
        scores_from_g(np.array([0.1, np.nan]), np.array([30, 30]))
    bad = s.copy()
    bad.data[0] = np.nan
    with pytest.raises(SaealignError, match="NaN or inf"):
        latent_g(bad, HAND_D)
    bad.data[0] = -1.0
    with pytest.raises(SaealignError, match="negative"):
        prepare_summary(bad)


def test_duplicate_entries_count_one_prompt() -> None:
    coo = sp.coo_matrix((np.array([0.25, 0.25, 1.0], np.float32), ([0, 0, 1], [0, 0, 0])), shape=(2, 1))
    g, weight, n_prompts = latent_g(coo, np.array([1.0, 4.0]))
    np.testing.assert_array_equal(n_prompts, [2])
    np.testing.assert_allclose(g, [(0.5 * 1 + 1.0 * 4) / 1.5])


def _stats() -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    # 5 prompts x 3 latents; prompt 3 and the pattern of the last prompt test empty/odd rows.
    indptr = np.array([0, 2, 3, 5, 5, 6])
    indices = np.array([0, 1, 0, 1, 2, 2])
    shape = (5, 3)
    act_sum = sp.csr_matrix((np.array([2.0, 2.0, 3.0, 1.0, 3.0, 4.0], np.float32), indices, indptr), shape)
    act_max = sp.csr_matrix((np.array([1.5, 2.0, 3.0, 1.0, 2.0, 4.0], np.float32), indices, indptr), shape)
    act_count = sp.csr_matrix((np.array([2, 1, 1, 1, 2, 0], np.int32), indices, indptr), shape)
    return act_sum, act_max, act_count, np.array([4, 2, 5, 3, 8])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("normalized_sum", [[0.5, 0.5, 0], [1, 0, 0], [0, 0.25, 0.75], [0, 0, 0], [0, 0, 1]]),
        ("sum", [[2, 2, 0], [3, 0, 0], [0, 1, 3], [0, 0, 0], [0, 0, 4]]),
        ("mean", [[0.5, 0.5, 0], [1.5, 0, 0], [0, 0.2, 0.6], [0, 0, 0], [0, 0, 0.5]]),
        ("max", [[1.5, 2, 0], [3, 0, 0], [0, 1, 2], [0, 0, 0], [0, 0, 4]]),
        ("binary", [[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]]),
    ],
)
def test_summary_kinds_by_hand(kind: str, expected: list[list[float]]) -> None:
    out = summary_matrix(*_stats(), kind=kind)
    assert isinstance(out, sp.csr_matrix) and out.dtype == np.float32 and out.shape == (5, 3)
    np.testing.assert_allclose(out.toarray(), np.array(expected, dtype=np.float32), rtol=1e-6)
    np.testing.assert_array_equal(out.indptr, _stats()[0].indptr)  # one sparsity pattern for all kinds


def test_summary_errors() -> None:
    act_sum, act_max, act_count, n_tokens = _stats()
    assert set(SUMMARIES) == {"normalized_sum", "sum", "mean", "max", "binary"}
    with pytest.raises(SaealignError, match="unknown summary"):
        summary_matrix(act_sum, act_max, act_count, n_tokens, kind="median")
    other = sp.csr_matrix(np.eye(5, 3, dtype=np.float32))
    with pytest.raises(SaealignError, match="act_max does not share"):
        summary_matrix(act_sum, other, act_count, n_tokens, kind="max")
    with pytest.raises(SaealignError, match="n_tokens 0"):
        summary_matrix(act_sum, act_max, act_count, np.array([4, 0, 5, 3, 8]), kind="mean")
    with pytest.raises(SaealignError, match="scipy sparse"):
        summary_matrix(act_sum.toarray(), act_max, act_count, n_tokens)  # type: ignore[arg-type]


def test_identity_topic_latents_rank_first() -> None:
    rng = np.random.default_rng(1)
    n, n_latents, n_a = 300, 30, 60
    label_a = np.zeros(n, dtype=bool)
    label_a[rng.choice(n, n_a, replace=False)] = True
    acts = rng.random((n, n_latents)) * (rng.random((n, n_latents)) < 0.5)
    acts[:, :5] = 0.0
    rows_a = np.flatnonzero(label_a)
    for i in range(5):  # latents 0-4 fire only on label-A prompts (each on a random 2/3 of them)
        fire = rng.choice(rows_a, 40, replace=False)
        acts[fire, i] = rng.random(40) + 0.1
    act = sp.csr_matrix(acts.astype(np.float32))
    summary = summary_matrix(act, act, act, np.full(n, 10))
    emb = rng.normal(size=(n, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    d = min_distances(emb, emb[label_a])
    assert np.all(d[label_a] < 1e-3) and np.all(d[~label_a] > 0.1)  # float32 cosines: identical texts ~3e-4
    ts = score_topic(summary, d, min_prompts=20)
    assert sorted(ts.top(5)) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(ts.scores[:5], 1.0, atol=1e-3)


def test_kendall_tau_identical_reversed_and_top() -> None:
    a = np.array([0.9, 0.1, 0.5, 0.3, 0.7])
    assert kendall_tau(a, a) == pytest.approx(1.0)
    assert kendall_tau(a, -a) == pytest.approx(-1.0)
    # top-2 of a: {0, 4}; top-2 of b: {1, 3}; union {0, 1, 3, 4} where b reverses a.
    b = np.array([0.0, 1.0, 0.4, 0.8, 0.2])
    assert kendall_tau(a, b, top=2) == pytest.approx(-1.0)
    with pytest.raises(SaealignError, match="undefined"):
        kendall_tau(a, a, top=1)
    with pytest.raises(SaealignError, match="cannot compare"):
        kendall_tau(a, a[:4])


def _topic(scores: list[float], g: list[float], scored: list[bool]) -> TopicScores:
    return TopicScores(
        scores=np.array(scores),
        g=np.array(g),
        n_prompts=np.where(scored, 30, 3),
        scored=np.array(scored),
        topic_texts=["a", "b"],
        sae_key="sae-x",
        index_key="idx-1",
    )


def test_kendall_tau_uses_scored_in_both() -> None:
    a = _topic([1.0, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [True, True, True, False])
    b = _topic([0.0, 0.5, 1.0, 0.9], [0.3, 0.2, 0.1, 0.0], [True, True, True, True])
    assert kendall_tau(a, b) == pytest.approx(-1.0)  # latent 3 (unscored in a) is left out


def test_top_tie_breaks() -> None:
    ts = _topic([1.0, 1.0, 0.5, 1.0, 1.0], [0.2, 0.1, 0.5, 0.1, 0.2], [True, True, True, False, True])
    assert ts.top(4) == [1, 0, 4, 2]
    assert ts.top(0) == [] and ts.top(100) == [1, 0, 4, 2]


def test_save_load_round_trip(tmp_path) -> None:
    ts = score_topic(
        sp.csr_matrix(HAND_SUMMARY), HAND_D, min_prompts=1, topic_texts=["heart", "lung"], sae_key="s", index_key="i"
    )
    ts.g[1] = np.nan  # NaN (never fires) must survive the round trip
    ts.extra["strength"] = 1.5
    folder = ts.save(tmp_path / "medical.scores")
    back = TopicScores.load(folder)
    for name in ("scores", "g", "n_prompts", "scored"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ts, name))
        assert getattr(back, name).dtype == getattr(ts, name).dtype
    for name in ("topic_texts", "summary", "metric", "min_prompts", "index_key", "sae_key", "note", "extra"):
        assert getattr(back, name) == getattr(ts, name)
    ts.save(folder)  # overwriting an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["medical.scores"]


def test_load_errors(tmp_path) -> None:
    with pytest.raises(SaealignError, match="no topic scores at"):
        TopicScores.load(tmp_path / "nothing")
    folder = _topic([1.0, 0.0], [0.1, 0.2], [True, True]).save(tmp_path / "t")
    meta = json.loads((folder / "scores.json").read_text())
    (folder / "scores.json").write_text(json.dumps({**meta, "d_sae": 3}))
    with pytest.raises(SaealignError, match="mismatched"):
        TopicScores.load(folder)
    (folder / "scores.json").write_text("{not json")
    with pytest.raises(SaealignError, match="corrupt"):
        TopicScores.load(folder)
    (folder / "scores.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sae_key"}))
    with pytest.raises(SaealignError, match=r"lack \['sae_key'\]"):
        TopicScores.load(folder)
    (folder / "scores.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(SaealignError, match="not a saealign topic-scores file"):
        TopicScores.load(folder)
    (folder / "scores.json").write_text(json.dumps(meta))
    (folder / "scores.safetensors").write_bytes(b"garbage")
    with pytest.raises(SaealignError, match="corrupt"):
        TopicScores.load(folder)
    with pytest.raises(SaealignError, match="JSON-serialisable"):
        TopicScores(np.zeros(1), np.zeros(1), np.zeros(1), np.ones(1), [], extra={"x": object()}).save(tmp_path / "u")
    assert not (tmp_path / "u").exists()


def test_check_compatible_and_tensor() -> None:
    ts = _topic([1.0, 0.0], [0.1, 0.2], [True, True])
    ts.check_compatible("sae-x", 2)
    ts.check_compatible("", 2)  # unknown key: only the width is checked
    msg = r"scores were made for SAE sae-x \(2 latents\) but this SAE is sae-y \(4608 latents\): re-score the topic"
    with pytest.raises(SaealignError, match=msg):
        ts.check_compatible("sae-y", 4608)
    with pytest.raises(SaealignError, match="re-score"):
        ts.check_compatible("sae-x", 3)
    t = ts.as_tensor("cpu", torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.tolist() == [1.0, 0.0]
    assert ts.as_tensor().dtype == torch.float32
    with pytest.raises(SaealignError, match="one length"):
        TopicScores(np.zeros(2), np.zeros(3), np.zeros(2), np.ones(2), [])
