"""``diffmean``: the SAE-free control, a push along the difference of mean residuals (topic texts minus own text)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_sae
from saealign.errors import SaealignError
from saealign.evaluate.steer_bench import default_conditions
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.reference.scoring import TopicScores
from saealign.residual_stream import content_mask, residuals_at
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering import mean_shift as ms
from saealign.steering.aligner import Aligner
from saealign.steering.spec import COMPANION_MAIN_SHARE, DEFAULT_COMPANION_PUSH, PUSH_ONLY
from saealign.steering.spec import GenerationSpec as Spec

TEXTS = ["the dog runs near the river", "a big dog and a small cat", "the old dog sat under the tree"]


def _topic(sae: SAE, texts: list[str] = TEXTS) -> TopicScores:
    scores = np.random.default_rng(0).random(sae.d_sae).astype(np.float32)
    return TopicScores(scores, np.zeros(sae.d_sae), np.full(sae.d_sae, 30), np.ones(sae.d_sae, bool), list(texts),
                       sae_key=sae_key(sae))


@pytest.fixture
def aligners(tiny_lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Aligner, Aligner]:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))
    single = Aligner(tiny_lm, make_sae(seed=1), 1, embedder=HashingEmbedder())
    paired = Aligner(tiny_lm, single.sae, 1, embedder=HashingEmbedder(), companions=[(make_sae(seed=2), 0)])
    return single, paired


@torch.inference_mode()
def test_residual_mean_is_the_mean_over_content_tokens_text_by_text(tiny_lm: LoadedModel) -> None:
    got = ms.residual_mean(tiny_lm, 1, TEXTS, batch_size=2)  # padded batches read like single texts
    rows = []
    for text in TEXTS:
        ids = torch.tensor([tiny_lm.tokenizer(text)["input_ids"]])
        mask = torch.ones_like(ids)
        hidden = residuals_at(tiny_lm.model, 1, ids, mask)[0]
        rows.append(hidden[content_mask(ids, mask, set(tiny_lm.tokenizer.all_special_ids))[0]].double())
    assert np.allclose(got, torch.cat(rows).mean(dim=0).numpy(), atol=1e-5)


def test_mean_shift_is_the_unit_difference_or_one_error() -> None:
    topic, own = np.array([3.0, 4.0, 1.0]), np.array([0.0, 0.0, 1.0])
    assert torch.equal(ms.mean_shift(topic, own), torch.tensor([0.6, 0.8, 0.0]))
    with pytest.raises(SaealignError, match="read like the model's own text"):
        ms.mean_shift(own, own)
    with pytest.raises(SaealignError, match="different models"):
        ms.mean_shift(topic, own[:2])
    with pytest.raises(SaealignError, match="not finite"):
        ms.mean_shift(np.array([np.nan, 0.0, 0.0]), own)


def test_the_push_is_strength_rho_and_the_mean_shift_at_every_layer(aligners: tuple[Aligner, Aligner]) -> None:
    _, paired = aligners
    s = 0.6
    plan = paired._plan(["the cat", "a dog runs"], _topic(paired.sae), Spec("diffmean", strength=s), 0, None, None)
    own = ms.residual_mean(paired.lm, 1, paired.default_texts())
    unit = ms.mean_shift(ms.residual_mean(paired.lm, 1, TEXTS), own)
    rho = paired.steering_basis().residual_norm
    assert plan.hook is not None and plan.hook.direction is not None and plan.hook.steering.method == "diffmean"
    for row in plan.hook.direction:
        assert torch.allclose(row, unit * (s * COMPANION_MAIN_SHARE * rho), atol=1e-5)
    # the companion pushes along its own layer's mean shift, in its own residual norm
    side = paired.companions[0].aligner
    ((side_hook, block),) = plan.companions
    side_unit = ms.mean_shift(ms.residual_mean(paired.lm, 0, TEXTS), ms.residual_mean(paired.lm, 0, side.default_texts()))
    want = side_unit * (s * COMPANION_MAIN_SHARE * DEFAULT_COMPANION_PUSH * side.steering_basis().residual_norm)
    assert block is side.block and side_hook.steering.method == "diffmean"
    assert side_hook.direction is not None and torch.allclose(side_hook.direction[0], want, atol=1e-5)
    assert side.default_texts() == paired.default_texts()  # sampled once, shared with the companion


def test_strength_zero_is_the_unsteered_text_and_a_push_changes_it(aligners: tuple[Aligner, Aligner]) -> None:
    single, _ = aligners
    topic = _topic(single.sae)
    prompts = ["the cat", "a dog runs near the"]
    plain = single.generate(prompts, None, Spec("none", greedy=True, max_new_tokens=6))
    zero = single.generate(prompts, topic, Spec("diffmean", strength=0.0, greedy=True, max_new_tokens=6))
    pushed = single.generate(prompts, topic, Spec("diffmean", strength=2.0, greedy=True, max_new_tokens=6))
    assert [g.token_ids for g in zero] == [g.token_ids for g in plain]
    assert [g.token_ids for g in pushed] != [g.token_ids for g in plain]
    assert all(g.method == "diffmean" and g.strength == 2.0 for g in pushed)


def test_the_own_text_mean_is_cached_and_a_corrupt_cache_is_remeasured(tiny_lm: LoadedModel, tmp_path: Path) -> None:
    calls: list[int] = []

    def own() -> list[str]:
        calls.append(1)
        return TEXTS

    first = ms.load_or_measure_own_mean(tiny_lm, 1, ["p"], {"seeds": 1}, own, folder=tmp_path)
    again = ms.load_or_measure_own_mean(tiny_lm, 1, ["p"], {"seeds": 1}, own, folder=tmp_path)
    assert np.array_equal(first, again) and len(calls) == 1
    (file,) = tmp_path.glob("own-mean-*.json")
    for broken in ("{oops", json.dumps({"key": "other", "mean": first.tolist()}), json.dumps({"mean": [1.0]})):
        file.write_text(broken)
        assert np.array_equal(ms.load_or_measure_own_mean(tiny_lm, 1, ["p"], {"seeds": 1}, own, folder=tmp_path), first)
    assert len(calls) == 4
    ms.load_or_measure_own_mean(tiny_lm, 0, ["p"], {"seeds": 1}, own, folder=tmp_path)  # another layer: its own file
    assert len(list(tmp_path.glob("own-mean-*.json"))) == 2


def test_topics_without_texts_or_like_the_own_text_are_one_error(aligners: tuple[Aligner, Aligner]) -> None:
    single, _ = aligners
    bare = _topic(single.sae, [])
    with pytest.raises(SaealignError, match="hold no topic texts"):
        single.generate(["the cat"], bare, Spec("diffmean", max_new_tokens=2))
    own = _topic(single.sae, single.default_texts())
    with pytest.raises(SaealignError, match="read like the model's own text"):
        single.generate(["the cat"], own, Spec("diffmean", max_new_tokens=2))


def test_diffmean_is_a_push_only_method_with_adds_range_and_a_bench_row() -> None:
    assert "diffmean" in PUSH_ONLY and Spec("diffmean").strength == Spec("add").strength
    # diffmean takes add's whole recipe: the same push, prompt boost, slot and temperature
    assert (Spec("diffmean").boost, Spec("diffmean").slot, Spec("diffmean").heat) == (Spec().boost, Spec().slot, Spec().heat)
    with pytest.raises(SaealignError, match="strength for diffmean must be"):
        Spec("diffmean", strength=2.5)
    rows = {c.label: c.spec for c in default_conditions()}
    # the default's push, slot and temperature, along the SAE-free direction
    assert rows["diffmean 0.05 prompt x4 slot 1 T1.2"] == Spec("diffmean")
