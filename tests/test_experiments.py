"""The latent- and layer-level experiments (Fig. 3-6, A.2): identities and hand computations."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import build_tiny_index, make_sae, make_texts
from saealign.errors import SaealignError
from saealign.evaluate.experiments import coverage_curve, summary_ablation, topk_token_share
from saealign.evaluate.layer_stats import layer_statistics, layer_token_rows, layer_token_values
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.reference.index import ReferenceIndex
from saealign.reference.scoring import TopicScores, kendall_tau
from saealign.residual_stream import content_mask, residuals_at, special_token_ids
from saealign.sae.autoencoder import SAE
from saealign.steering.edits import Steering, contamination

MIN_PROMPTS = 5  # the tiny index has 48 prompts: the paper's 20 would leave few latents scored
ALIGNED = make_texts(6, seed=11, min_words=4, max_words=9)
UNALIGNED = make_texts(5, seed=12, min_words=4, max_words=9)


@pytest.fixture(scope="module")
def lm(tiny_lm: LoadedModel) -> LoadedModel:
    return tiny_lm


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(scope="module")
def index(lm: LoadedModel, sae: SAE, tmp_path_factory: pytest.TempPathFactory) -> ReferenceIndex:
    texts = make_texts(48, seed=5, min_words=4, max_words=12)
    return build_tiny_index(lm, sae, tmp_path_factory.mktemp("experiments"), texts, ["x"] * len(texts),
                            shard_size=16, batch_size=8)


def hand_acts(lm: LoadedModel, sae: SAE, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One text alone (no batch, no padding): residuals ``[n, d]`` and SAE latents ``[n, L]`` of its content tokens."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    mask = torch.ones_like(ids)
    x = residuals_at(lm.model, 0, ids, mask)[content_mask(ids, mask, special_token_ids(lm.tokenizer))]
    return x, sae.encode(x)


# -- coverage (Fig. 3) -----------------------------------------------------------------------------------
def toy_index() -> ReferenceIndex:
    """4 prompts x 3 latents: latent 0 fires on prompts 0-2, latent 1 on prompt 1, latent 2 is dead."""
    act_sum = sp.csr_matrix(np.array([[1.0, 0, 0], [2.0, 3.0, 0], [0.5, 0, 0], [0, 0, 0]], dtype=np.float32))
    fake = SimpleNamespace(act_sum=act_sum, n_prompts=4, d_sae=3, latent_n_prompts=np.array([3, 1, 0]))
    return cast(ReferenceIndex, fake)


def test_coverage_at_full_size_is_the_exact_live_share(index: ReferenceIndex) -> None:
    rows = coverage_curve(index, sizes=(8, 16, 1000), samples=3, seed=1, min_prompts=MIN_PROMPTS)
    assert [r["size"] for r in rows] == [8, 16, index.n_prompts]  # 1000 > 48 dropped, the full size added
    full = rows[-1]
    fires = (index.act_sum.toarray() > 0).sum(axis=0)  # hand count over the dense [48, 256] matrix
    live = fires > 0
    assert full["live"] == live.sum() and full["d_sae"] == index.d_sae
    assert full["live_share"] == pytest.approx(live.mean())
    assert full["active_mean"] == full["active_min"] == full["active_max"] == 1.0
    expected = (fires >= MIN_PROMPTS).sum() / live.sum()
    assert full["scored_min"] == full["scored_max"] == pytest.approx(expected)
    assert 0 < expected < 1  # the criterion bites on this index
    for r in rows:
        assert r["active_min"] <= r["active_mean"] <= r["active_max"] <= 1
        assert r["scored_mean"] <= r["active_mean"]  # per sample, scored latents are active ones
    assert rows[0]["active_max"] < 1  # 8 of 48 prompts miss some live latents


def test_coverage_counts_a_toy_index_by_hand() -> None:
    toy = toy_index()
    rows = coverage_curve(toy, sizes=(1, 2), samples=40, seed=0, min_prompts=2)
    one, two, full = rows
    assert full["live"] == 2 and full["live_share"] == pytest.approx(2 / 3)
    assert (full["active_mean"], full["scored_mean"]) == (1.0, 0.5)  # latent 1 fires on 1 prompt only
    # one prompt covers 1/2 (prompts 0, 2), 2/2 (prompt 1) or 0 (prompt 3) of the live latents
    assert (one["active_min"], one["active_max"]) == (0.0, 1.0)
    assert one["scored_max"] == 0.0
    assert two["scored_max"] == 0.5  # without repetition no latent but latent 0 reaches 2 prompts
    again = coverage_curve(toy, sizes=(1, 2), samples=40, seed=0, min_prompts=2)
    assert again == rows  # seeded


def test_coverage_with_replacement_counts_a_repeated_prompt_twice() -> None:
    rows = coverage_curve(toy_index(), sizes=(2,), samples=200, seed=0, min_prompts=2, replace=True)
    assert rows[0]["scored_max"] == 1.0  # prompt 1 drawn twice: latent 1 fires on "2 prompts"


def test_coverage_rejects_bad_arguments(index: ReferenceIndex) -> None:
    with pytest.raises(SaealignError, match="samples"):
        coverage_curve(index, samples=0)
    with pytest.raises(SaealignError, match="positive"):
        coverage_curve(index, sizes=(0, 8))


# -- top-k token share (Fig. 4) ----------------------------------------------------------------------
def test_topk_with_every_latent_is_the_share_of_tokens_with_any_active_latent(lm: LoadedModel, sae: SAE) -> None:
    scores = np.linspace(1, 0, sae.d_sae)
    rows = topk_token_share(sae, lm, 0, scores, ALIGNED, UNALIGNED, ks=(sae.d_sae,), batch_size=4)
    any_active = torch.cat([hand_acts(lm, sae, t)[1] for t in ALIGNED]).ne(0).any(dim=-1).float().mean()
    assert rows[0]["aligned_share"] == float(any_active) == 1.0  # a TopK SAE always fires k latents
    assert rows[0]["unaligned_share"] == 1.0 and rows[0]["k_used"] == sae.d_sae
    # the word-level tokenizer prepends <s>: every word is a content token
    assert rows[0]["aligned_tokens"] == sum(len(t.split()) for t in ALIGNED)
    assert rows[0]["unaligned_tokens"] == sum(len(t.split()) for t in UNALIGNED)


def test_topk_top1_matches_a_direct_computation(lm: LoadedModel, sae: SAE) -> None:
    acts = {kind: torch.cat([hand_acts(lm, sae, t)[1] for t in texts]) for kind, texts in
            (("aligned", ALIGNED), ("unaligned", UNALIGNED))}
    rate = acts["aligned"].ne(0).float().mean(dim=0)
    latent = int(torch.argmin((rate - 0.4).abs()))  # fires on some aligned tokens, not all
    scores = np.full(sae.d_sae, 0.5)
    scores[latent] = 1.0
    scores[(latent + 1) % sae.d_sae] = 0.9  # second best
    rows = topk_token_share(sae, lm, 0, scores, ALIGNED, UNALIGNED, ks=(1, 2), batch_size=4)
    fires = {kind: a[:, latent] != 0 for kind, a in acts.items()}
    assert 0 < fires["aligned"].float().mean() < 1
    assert rows[0]["aligned_share"] == pytest.approx(float(fires["aligned"].float().mean()))
    assert rows[0]["unaligned_share"] == pytest.approx(float(fires["unaligned"].float().mean()))
    assert rows[0]["difference"] == pytest.approx(rows[0]["aligned_share"] - rows[0]["unaligned_share"])
    either = (acts["aligned"][:, latent] != 0) | (acts["aligned"][:, (latent + 1) % sae.d_sae] != 0)
    assert rows[1]["aligned_share"] == pytest.approx(float(either.float().mean()))


def test_topk_uses_only_scored_latents(lm: LoadedModel, sae: SAE) -> None:
    raw = np.linspace(0, 1, sae.d_sae, dtype=np.float32)
    scored = np.zeros(sae.d_sae, dtype=bool)
    scored[[3, 7]] = True
    topic = TopicScores(scores=np.where(scored, raw, 0), g=-raw, n_prompts=np.where(scored, 30, 1), scored=scored,
                        topic_texts=["t"])
    rows = topk_token_share(sae, lm, 0, topic, ALIGNED, UNALIGNED, ks=(1, 2, 50))
    assert [r["k_used"] for r in rows] == [1, 2, 2]
    assert rows[1] == {**rows[2], "k": 2}  # k beyond the scored latents adds nothing
    acts = torch.cat([hand_acts(lm, sae, t)[1] for t in ALIGNED])
    assert rows[0]["aligned_share"] == pytest.approx(float((acts[:, 7] != 0).float().mean()))  # 7 scores higher


def test_topk_truncates_and_rejects_bad_input(lm: LoadedModel, sae: SAE) -> None:
    rows = topk_token_share(sae, lm, 0, np.ones(sae.d_sae), ALIGNED, UNALIGNED, ks=(1,), max_seq_len=3)
    assert rows[0]["aligned_tokens"] == 2 * len(ALIGNED)  # <s> + 2 words, <s> not counted
    with pytest.raises(SaealignError, match="aligned"):
        topk_token_share(sae, lm, 0, np.ones(sae.d_sae), [" "], UNALIGNED)
    with pytest.raises(SaealignError, match="finite"):
        topk_token_share(sae, lm, 0, np.ones(sae.d_sae + 1), ALIGNED, UNALIGNED)
    with pytest.raises(SaealignError, match="ks"):
        topk_token_share(sae, lm, 0, np.ones(sae.d_sae), ALIGNED, UNALIGNED, ks=(0,))


# -- layer level (Fig. 5/6) -------------------------------------------------------------------------------
KINDS = {"aligned": ALIGNED, "unaligned": UNALIGNED}


def random_scores(d_sae: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, d_sae).astype(np.float32)


def test_unedited_methods_change_nothing(lm: LoadedModel, sae: SAE) -> None:
    scores = random_scores(sae.d_sae)
    rows = layer_statistics(sae, lm, 0, scores, None, KINDS, methods=("none", "sae"), mode="error", batch_size=4)
    assert [(r["method"], r["kind"]) for r in rows] == [("none", "aligned"), ("sae", "aligned"),
                                                        ("none", "unaligned"), ("sae", "unaligned")]
    for r in rows:
        assert r["changed_mean"] == r["changed_max"] == 0
        assert r["err_diff"] == r["err_diff_rel"] == r["shift"] == 0.0  # exactly: error mode keeps x bit for bit
        assert r["contamination"] == pytest.approx(r["contamination_plain"])
        assert r["active_mean"] == sae.cfg.k and r["err_plain"] > 0
    # swap with every score 1 weights nothing: the plain SAE again
    flat = layer_statistics(sae, lm, 0, np.ones(sae.d_sae, dtype=np.float32), None, KINDS, methods=("swap",))
    assert all(r["changed_max"] == 0 and r["err_diff"] == 0.0 and r["contamination"] == 0.0 for r in flat)


def test_replace_mode_shift_of_the_plain_sae_is_its_reconstruction_error(lm: LoadedModel, sae: SAE) -> None:
    values = layer_token_values(sae, lm, 0, random_scores(sae.d_sae), None, KINDS, methods=("sae",), mode="replace")
    for v in values.values():
        np.testing.assert_array_equal(v["shift"], v["err_plain"])
        np.testing.assert_array_equal(v["err_diff"], 0)


def test_swap_and_clamp_match_a_hand_computation(lm: LoadedModel, sae: SAE) -> None:
    scores = random_scores(sae.d_sae)
    max_act = np.full(sae.d_sae, 3.0, dtype=np.float32)  # forced value 30: above every activation
    values = layer_token_values(sae, lm, 0, scores, max_act, {"aligned": ALIGNED[:2]}, methods=("clamp", "swap"),
                                batch_size=1)
    x = torch.cat([hand_acts(lm, sae, t)[0] for t in ALIGNED[:2]])
    s = torch.as_tensor(scores)
    gamma = sae.pre(x)
    a = sae.activate(gamma)
    swapped = torch.relu(gamma) * (sae.activate(gamma * s) != 0)
    clamped = a.clone()
    clamped[:, s.topk(5).indices] = 30.0
    for method, a_edit in (("swap", swapped), ("clamp", clamped)):
        v = values[(method, "aligned")]
        err = (x - sae.decode(a_edit)).norm(dim=-1) - (x - sae.decode(a)).norm(dim=-1)
        np.testing.assert_allclose(v["err_diff"], err.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(v["changed"], (a_edit != a).sum(dim=-1).numpy())
        np.testing.assert_allclose(v["contamination"], contamination(a_edit, s).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v["shift"], (sae.decode(a_edit) - sae.decode(a)).norm(dim=-1).numpy(),
                                   rtol=1e-4, atol=1e-4)  # error mode moves the output by dec(a') - dec(a)
    np.testing.assert_array_equal(values[("clamp", "aligned")]["changed"], 5)
    assert values[("swap", "aligned")]["changed"].max() > 0  # random scores do swap latents
    np.testing.assert_array_equal(values[("swap", "aligned")]["text"],
                                  np.repeat([0, 1], [len(t.split()) for t in ALIGNED[:2]]))


def test_steering_options_reach_the_edit(lm: LoadedModel, sae: SAE) -> None:
    rows = layer_statistics(sae, lm, 0, random_scores(sae.d_sae), np.full(sae.d_sae, 3.0), {"aligned": ALIGNED},
                            methods=("clamp",), steering=Steering(clamp_n=2))
    assert rows[0]["changed_mean"] == rows[0]["changed_max"] == 2


def test_token_rows_name_each_token(lm: LoadedModel, sae: SAE) -> None:
    values = layer_token_values(sae, lm, 0, random_scores(sae.d_sae), None, {"aligned": ALIGNED[:3]},
                                methods=("swap",), batch_size=2)
    rows = layer_token_rows(lm, values)
    assert [r["token"] for r in rows] == [w for t in ALIGNED[:3] for w in t.split()]
    assert [r["position"] for r in rows] == [p for t in ALIGNED[:3] for p in range(len(t.split()))]
    assert rows[0]["changed"] == int(values[("swap", "aligned")]["changed"][0]) and rows[0]["method"] == "swap"


def test_layer_statistics_rejects_bad_input(lm: LoadedModel, sae: SAE) -> None:
    scores = random_scores(sae.d_sae)
    with pytest.raises(SaealignError, match="max_act"):
        layer_statistics(sae, lm, 0, scores, None, KINDS, methods=("clamp",))
    with pytest.raises(SaealignError, match="unknown"):
        layer_statistics(sae, lm, 0, scores, None, KINDS, methods=("nudge",))
    with pytest.raises(SaealignError, match=r"\[0, 1\]"):
        layer_statistics(sae, lm, 0, scores * 2, None, KINDS, methods=("swap",))
    with pytest.raises(SaealignError, match="unaligned"):
        layer_statistics(sae, lm, 0, scores, None, {"aligned": ALIGNED, "unaligned": [""]}, methods=("swap",))


# -- summary ablation (A.2) ------------------------------------------------------------------------------
def test_summary_ablation_table(index: ReferenceIndex) -> None:
    topic = index.texts[:3]
    rows = summary_ablation(index, topic, HashingEmbedder(), min_prompts=MIN_PROMPTS, top=(None, 10), overlap=5)
    assert len(rows) == len(index.summaries) ** 2
    table = {(r["a"], r["b"]): r for r in rows}
    for a in index.summaries:
        assert table[(a, a)]["tau_all"] == pytest.approx(1.0, abs=1e-12)
        assert table[(a, a)]["tau_top10"] == pytest.approx(1.0, abs=1e-12)
        assert table[(a, a)]["overlap_top5"] == 1.0
        for b in index.summaries:
            for col in ("tau_all", "tau_top10", "overlap_top5"):
                assert table[(a, b)][col] == pytest.approx(table[(b, a)][col], abs=1e-12)
    direct = {s: index.score(topic, HashingEmbedder(), summary=s, min_prompts=MIN_PROMPTS) for s in ("sum", "binary")}
    assert table[("sum", "binary")]["tau_all"] == pytest.approx(kendall_tau(direct["sum"], direct["binary"]))
    assert table[("sum", "binary")]["tau_top10"] == pytest.approx(kendall_tau(direct["sum"], direct["binary"], top=10))
    shared = set(direct["sum"].top(5)) & set(direct["binary"].top(5))
    assert table[("sum", "binary")]["overlap_top5"] == len(shared) / 5
    assert table[("sum", "binary")]["tau_all"] < 1  # the summaries do rank differently


def test_summary_ablation_rejects_bad_input(index: ReferenceIndex) -> None:
    with pytest.raises(SaealignError, match="unknown"):
        summary_ablation(index, ["the cat"], HashingEmbedder(), summaries=("median",))
    with pytest.raises(SaealignError, match="embedded with"):
        summary_ablation(index, ["the cat"], HashingEmbedder(dim=32), min_prompts=MIN_PROMPTS)
    with pytest.raises(SaealignError, match="topic"):
        summary_ablation(index, ["  "], HashingEmbedder(), min_prompts=MIN_PROMPTS)
