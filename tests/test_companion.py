"""Companion layers: further additive pushes at other blocks, each with its own SAE, beside the main one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_llama, make_sae, make_tokenizer
from saealign import residual_stream
from saealign.defaults import COMPANION_LAYERS, DEFAULT_LAYER, default_companions
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference import contrast as contrast_module
from saealign.reference.embed import HashingEmbedder
from saealign.reference.scoring import TopicScores
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering import directions
from saealign.steering import strength as search
from saealign.steering.aligner import Aligner
from saealign.steering.decoding import Sampling, decode_steps, row_generator
from saealign.steering.spec import COMPANION_MAIN_SHARE, DEFAULT_COMPANION_PUSH
from saealign.steering.spec import GenerationSpec as Spec

TEXTS = ["the dog runs near the river", "a big dog and a small cat", "the old dog sat under the tree"]


@pytest.fixture
def main_sae() -> SAE:
    return make_sae(seed=1)


@pytest.fixture
def side_sae() -> SAE:
    return make_sae(seed=2)


def _topic(sae: SAE) -> TopicScores:
    scores = np.random.default_rng(0).random(sae.d_sae).astype(np.float32)
    return TopicScores(scores, np.zeros(sae.d_sae), np.full(sae.d_sae, 30), np.ones(sae.d_sae, bool), list(TEXTS),
                       sae_key=sae_key(sae))


def _companion_unit(owner: Aligner, side: Aligner, topic: TopicScores) -> torch.Tensor:
    """The companion ``side``'s unit topic direction by hand: M1 scores all 1 (no index), its own contrast (against
    the model's own text), output scores and output match."""
    side_topic = owner.companion_topic(topic, side)
    return directions.topic_direction(side.sae, torch.ones(side.sae.d_sae), 64,
                                      torch.as_tensor(side.steering_basis().output_scores),
                                      torch.as_tensor(side_topic.contrast), torch.as_tensor(side.output_match(side_topic)))


@pytest.fixture
def aligners(tiny_lm: LoadedModel, main_sae: SAE, side_sae: SAE, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> tuple[Aligner, Aligner]:
    """The tiny 2-block Llama steered at block 1, with and without block 0 as its companion."""
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))
    single = Aligner(tiny_lm, main_sae, 1, embedder=HashingEmbedder())
    paired = Aligner(tiny_lm, main_sae, 1, embedder=HashingEmbedder(), companions=[(side_sae, 0)])
    return single, paired


def test_the_spec_checks_the_companion_push() -> None:
    assert Spec().companion_push is None  # resolved by the aligner, which knows whether it has a companion
    for bad in (-0.5, 9.0, float("nan"), True, "2"):
        with pytest.raises(SaealignError, match="companion_push must be a number from 0 to 8"):
            Spec("add", companion_push=bad)  # type: ignore[arg-type]
    with pytest.raises(SaealignError, match="pushes the companion layer past add's largest strength"):
        Spec("add", strength=2.0, companion_push=2.0)  # 2 x 2/3 x 2 > 2
    assert Spec("add", strength=1.5, companion_push=2.0).companion_push == 2.0  # 1.5 x 2/3 x 2 = 2: at the edge
    # there the default prompt boost gives way (x1), as it does to a strong push alone; a boost named is checked
    assert Spec("add", strength=1.5, companion_push=2.0).boost == 1.0 and Spec("add", strength=1.0).boost == 2.0
    assert Spec("add", strength=0.3, companion_push=2.0).boost == 4.0  # 0.3 x 4 x 2/3 x 2 = 1.6: room enough
    with pytest.raises(SaealignError, match="pushes the companion layer past"):
        Spec("add", strength=1.0, companion_push=2.0, prompt_boost=2)


def test_resolve_fills_the_default_only_where_there_is_a_companion(aligners: tuple[Aligner, Aligner]) -> None:
    single, paired = aligners
    assert single.companions == () and [(c.aligner.layer, c.weight) for c in paired.companions] == [(0, 1.0)]
    assert single.resolve(Spec()).companion_push == 0
    assert paired.resolve(Spec()).companion_push == DEFAULT_COMPANION_PUSH
    assert paired.resolve(Spec("swap")).companion_push == 0  # Swap has no push to share
    assert paired.resolve(Spec(companion_push=0.5)).companion_push == 0.5
    with pytest.raises(SaealignError, match="companion_push needs an aligner with companion layers"):
        single.generate(["the cat"], _topic(single.sae), Spec(companion_push=1.0, max_new_tokens=2))


def test_both_pushes_are_the_by_hand_directions(aligners: tuple[Aligner, Aligner]) -> None:
    _, paired = aligners
    companion = paired.companions[0].aligner
    topic = paired.with_contrast(_topic(paired.sae))
    s, push = 0.6, 1.5
    spec = Spec("add", strength=s, companion_push=push)
    plan = paired._plan(["the cat", "a dog runs"], topic, spec, 0, None, None)
    assert plan.strengths == [s, s]  # what the user asked for is what the generation reports
    basis = paired.steering_basis()
    main = directions.topic_direction(paired.sae, torch.as_tensor(topic.scores), spec.n_latents,
                                      torch.as_tensor(basis.output_scores), torch.as_tensor(topic.contrast),
                                      torch.as_tensor(paired.output_match(topic)))
    assert plan.hook is not None and plan.hook.direction is not None
    assert torch.allclose(plan.hook.direction[0], main * (s * COMPANION_MAIN_SHARE * basis.residual_norm), atol=1e-5)
    # the companion: M1 scores all 1 (no index), its own contrast (against the model's own text), output scores and
    # output match; pushed `push` times the main layer's strength in its own residual norm
    side_topic = paired.companion_topic(topic, companion)
    assert np.array_equal(side_topic.scores, np.ones(companion.sae.d_sae, np.float32))
    assert side_topic.contrast is not None and side_topic.sae_key == companion.sae_key
    side = _companion_unit(paired, companion, topic)
    ((side_hook, block),) = plan.companions
    assert block is companion.block and side_hook.sae is companion.sae and not side_hook.record
    assert side_hook.steering.method == "add" and side_hook.direction is not None
    want = side * (s * COMPANION_MAIN_SHARE * push * companion.steering_basis().residual_norm)
    assert torch.allclose(side_hook.direction[1], want, atol=1e-5)
    assert paired.companion_topic(_topic(paired.sae), companion) is side_topic  # remembered per topic texts


def test_scoring_reads_the_companions_topic_in_the_same_pass(aligners: tuple[Aligner, Aligner],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The main contrast's pass also reads every companion layer, so the companion's topic costs no second pass, and
    its contrast is the one a pass of its own gives."""
    _, paired = aligners
    companion = paired.companions[0].aligner
    paired.steering_basis(), companion.steering_basis()  # measured (with passes of their own) before the spy
    calls: list[list[int]] = []
    real = residual_stream.residuals_at_layers

    def counting(model, layers, *args):  # noqa: ANN001, ANN202 - a spy on the model passes
        calls.append(list(layers))
        return real(model, layers, *args)

    monkeypatch.setattr(residual_stream, "residuals_at_layers", counting)
    topic = paired.with_contrast(_topic(paired.sae))
    assert calls == [[1, 0]]  # one pass (one batch of 3 texts) for both layers
    side_topic = paired.companion_topic(topic, companion)
    assert calls == [[1, 0]]
    own = contrast_module.activation_contrast(contrast_module.mean_activation(paired.lm, companion.sae, 0, TEXTS),
                                              companion.reference_mean())
    assert np.array_equal(side_topic.contrast, own)
    # scores that already carry their contrast (loaded from disk) get the companion's in one pass of its own
    fresh = Aligner(paired.lm, paired.sae, 1, embedder=HashingEmbedder(), companions=[(companion.sae, 0)])
    fresh.companions[0].aligner.steering_basis()  # read from the disk cache
    calls.clear()
    again = fresh.companion_topic(topic, fresh.companions[0].aligner)
    assert calls == [[0]] and np.array_equal(again.contrast, own)


def test_the_topic_texts_are_embedded_once_for_every_layer(aligners: tuple[Aligner, Aligner]) -> None:
    _, paired = aligners
    companion = paired.companions[0].aligner
    seen: list[list[str]] = []
    embedder = paired.embedder
    assert embedder is not None and companion.embedder is embedder
    real = embedder.embed

    def counting(texts, *args, **kwargs):  # noqa: ANN001, ANN202 - a spy on the embedder
        seen.append(list(texts))
        return real(texts, *args, **kwargs)

    embedder.embed = counting  # type: ignore[method-assign]
    topic = paired.with_contrast(_topic(paired.sae))
    main = paired.output_match(topic)
    side = companion.output_match(paired.companion_topic(topic, companion))
    assert seen.count(TEXTS) == 1
    vectors = paired.topic_embeddings(TEXTS)
    assert np.array_equal(vectors, real(TEXTS)) and not vectors.flags.writeable
    assert main.shape == (paired.sae.d_sae,) and side.shape == (companion.sae.d_sae,)


def test_no_push_there_is_the_single_layer_aligner_token_for_token(aligners: tuple[Aligner, Aligner]) -> None:
    single, paired = aligners
    topic = _topic(single.sae)
    spec = Spec("add", strength=1.0, greedy=True, max_new_tokens=8)
    alone = single.generate(["the cat", "a dog runs near the"], topic, spec)
    off = paired.generate(["the cat", "a dog runs near the"], topic, Spec(**{**spec.to_json(), "companion_push": 0}))
    assert [g.token_ids for g in off] == [g.token_ids for g in alone]
    assert [g.token_contamination for g in off] == [g.token_contamination for g in alone]


@torch.inference_mode()
def test_the_companion_block_gets_its_push_on_the_edited_positions(aligners: tuple[Aligner, Aligner]) -> None:
    _, paired = aligners
    block = paired.companions[0].aligner.block
    plan = paired._plan(["the cat sat on the"], _topic(paired.sae), Spec("add", strength=0.9, companion_push=1.2),
                        0, None, None)
    seen: list[torch.Tensor] = []
    watch = block.register_forward_hook(lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out)
                                                                        .clone()))
    try:
        for hook, companions in ((None, ()), (plan.hook, plan.companions)):
            gen = [row_generator(0, "the cat sat on the")]
            next(decode_steps(paired.lm.model, plan.rows, Sampling(max_new_tokens=1), gen, 0, {2}, hook, paired.block,
                              companions=companions))
    finally:
        watch.remove()
    plain, pushed = seen
    ((side_hook, _),) = plan.companions
    assert side_hook.direction is not None
    assert torch.equal(pushed[0, 0], plain[0, 0])  # the first position is never edited
    assert torch.allclose(pushed[0, 1:] - plain[0, 1:], side_hook.direction[0].expand(plain.shape[1] - 1, -1),
                          atol=1e-5)


def test_a_companion_changes_what_auto_caches(aligners: tuple[Aligner, Aligner]) -> None:
    single, paired = aligners
    cfg = paired.auto_config
    on, off = paired.resolve(Spec()), paired.resolve(Spec(companion_push=0))
    assert search.cache_key(paired, on, cfg) != search.cache_key(paired, off, cfg)
    assert search.cache_key(paired, off, cfg) == search.cache_key(single, single.resolve(Spec()), cfg)


def test_bad_companions_are_one_error(tiny_lm: LoadedModel, main_sae: SAE, side_sae: SAE) -> None:
    with pytest.raises(SaealignError, match=r"read layers \[1\] beside this aligner's layer 1: give each its own"):
        Aligner(tiny_lm, main_sae, 1, companions=[(side_sae, 1)])
    with pytest.raises(SaealignError, match=r"read layers \[0, 0\] beside this aligner's layer 1"):
        Aligner(tiny_lm, main_sae, 1, companions=[(side_sae, 0), (make_sae(seed=3), 0)])
    with pytest.raises(SaealignError, match=r"SAE d_in=32 does not match the model's hidden size 64 \(layer 0\)"):
        Aligner(tiny_lm, main_sae, 1, companions=[(make_sae(d_in=32), 0)])
    with pytest.raises(SaealignError, match=r"a companion is \(sae, layer\) or \(sae, layer, weight\)"):
        Aligner(tiny_lm, main_sae, 1, companions=[(side_sae, 0, 0.5, 1)])  # type: ignore[list-item]
    for weight in (0.0, 1.5, float("nan"), "half", True):
        with pytest.raises(SaealignError, match=r"a companion's weight must lie in \(0, 1\]"):
            Aligner(tiny_lm, main_sae, 1, companions=[(side_sae, 0, weight)])
    paired = Aligner(tiny_lm, main_sae, 1, embedder=HashingEmbedder(), companions=[(side_sae, 0)])
    textless = _topic(main_sae)
    textless.topic_texts = []
    with pytest.raises(SaealignError, match="companion_push=0"):
        paired.companion_topic(textless, paired.companions[0].aligner)
    with pytest.raises(SaealignError, match="not a companion layer of this one"):
        paired.companion_topic(_topic(main_sae), paired)


def test_the_default_stack_alone_gets_the_shipped_companions() -> None:
    shipped = default_companions()
    assert [(layer, weight) for _, layer, weight in shipped] == list(COMPANION_LAYERS.items())
    assert [layer for _, layer, _ in shipped] == [6, 10]
    assert all(sae.cfg.hook_layer in (None, layer) for sae, layer, _ in shipped)
    assert len(default_companions(layer=DEFAULT_LAYER)) == 2
    assert default_companions(layer=6) == []  # steering at block 6 itself: no companions
    assert default_companions(sae_spec="some/other-sae") == [] and default_companions(model="gpt2") == []


def test_the_default_spec_steers_both_layers_and_reports_its_strength(aligners: tuple[Aligner, Aligner]) -> None:
    _, paired = aligners
    out = paired.generate(["the cat"], _topic(paired.sae), Spec(greedy=True, max_new_tokens=4))
    assert out[0].strength == Spec().strength and len(out[0].token_ids) == 4


def test_the_servers_search_copy_keeps_the_companion_and_its_cache_key(aligners: tuple[Aligner, Aligner]) -> None:
    from saealign.serve.limits import ServerGuard
    from saealign.serve.searches import StrengthSearches

    _, paired = aligners
    searches = StrengthSearches(paired, ServerGuard())
    try:
        copy = searches.searcher()
        ((mine, theirs),) = zip(copy.companions, paired.companions, strict=True)
        assert mine.aligner.sae is theirs.aligner.sae and mine.aligner.layer == theirs.aligner.layer
        assert mine.weight == theirs.weight
        assert mine.aligner.block is not theirs.aligner.block  # a block of the search's own model copy
        auto = Spec(strength="auto")  # the search caches where the worker looks
        assert search.cache_key(copy, copy.resolve(auto), copy.auto_config) == search.cache_key(
            paired, paired.resolve(auto), paired.auto_config)
    finally:
        searches.shutdown()


def test_a_push_that_measures_nothing_skips_the_sae_and_adds_the_same(main_sae: SAE,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from saealign.steering.edits import Steering
    from saealign.steering.hook import SteeringHook

    g = torch.Generator().manual_seed(0)
    hidden, push = torch.randn(2, 5, 64, generator=g), torch.randn(2, 64, generator=g)
    keep = torch.zeros(2, 5, dtype=torch.bool)
    keep[:, 0] = True
    scores = torch.full((2, main_sae.d_sae), 0.5)
    measuring = SteeringHook(main_sae, Steering("add"), scores, direction=push)
    measuring.keep = keep
    want = measuring(torch.nn.Identity(), (), (hidden,))
    quiet = SteeringHook(main_sae, Steering("add"), scores, direction=push, record=False)
    quiet.keep = keep
    monkeypatch.setattr(main_sae, "pre", lambda *_: pytest.fail("a push that records nothing ran the SAE"))
    got = quiet(torch.nn.Identity(), (), (hidden,))
    assert isinstance(got, tuple) and isinstance(want, tuple) and torch.equal(got[0], want[0])
    assert torch.equal(got[0][:, 0], hidden[:, 0]) and not quiet.contamination


def test_two_companions_each_push_their_weight_of_the_main_push(main_sae: SAE, side_sae: SAE, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-block model steered at block 2 with companions at blocks 0 (weight 1) and 1 (weight 0.25): each companion's
    push is strength x main share x companion_push x its weight, along its own SAE's direction, and the cache key of
    ``auto`` names both."""
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))
    lm = LoadedModel(model=make_llama(n_layers=3), tokenizer=make_tokenizer(), name="tiny-3", key="tiny3",
                     load_seconds=0.0)
    third = make_sae(seed=3)
    both = Aligner(lm, main_sae, 2, embedder=HashingEmbedder(), companions=[(side_sae, 0), (third, 1, 0.25)])
    one = Aligner(lm, main_sae, 2, embedder=HashingEmbedder(), companions=[(side_sae, 0)])
    topic = both.with_contrast(_topic(main_sae))
    s, push = 0.6, 1.5
    plan = both._plan(["the cat"], topic, Spec("add", strength=s, companion_push=push), 0, None, None)
    assert [block for _, block in plan.companions] == [c.aligner.block for c in both.companions]
    for (hook, _), companion in zip(plan.companions, both.companions, strict=True):
        side = companion.aligner
        unit = _companion_unit(both, side, topic)
        want = unit * (s * COMPANION_MAIN_SHARE * push * companion.weight * side.steering_basis().residual_norm)
        assert hook.direction is not None and torch.allclose(hook.direction[0], want, atol=1e-5)
    cfg = both.auto_config
    assert search.cache_key(both, both.resolve(Spec()), cfg) != search.cache_key(one, one.resolve(Spec()), cfg)
    out = both.generate(["the cat"], topic, Spec(greedy=True, max_new_tokens=3))
    assert len(out[0].token_ids) == 3
