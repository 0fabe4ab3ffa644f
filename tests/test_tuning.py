"""Tuned latent weights (``tune_steps``): add's mix of latents tuned so the pushed model finds the topic texts likely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_sae, make_texts
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.reference.scoring import TopicScores
from saealign.residual_stream import layer_module
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering import tuning
from saealign.steering.aligner import Aligner
from saealign.steering.directions import unit_decoder
from saealign.steering.spec import COMPANION_MAIN_SHARE, DEFAULT_COMPANION_PUSH
from saealign.steering.spec import GenerationSpec as Spec

TEXTS = make_texts(6, seed=3)


def _topic(sae: SAE, texts: list[str] = TEXTS) -> TopicScores:
    scores = np.random.default_rng(0).random(sae.d_sae).astype(np.float32)
    return TopicScores(scores, np.zeros(sae.d_sae), np.full(sae.d_sae, 30), np.ones(sae.d_sae, bool), list(texts),
                       sae_key=sae_key(sae))


def _layers(lm: LoadedModel, k: int = 8, length: float = 3.0) -> list[tuning.PushedLayer]:
    rows = unit_decoder(make_sae(seed=4))[:k]
    weights = torch.linspace(1.0, 0.2, k)
    return [tuning.PushedLayer(layer_module(lm.model, 1), rows, weights, length),
            tuning.PushedLayer(layer_module(lm.model, 0), unit_decoder(make_sae(seed=5))[:k], weights.flip(0), length)]


@pytest.fixture
def paired(tiny_lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Aligner:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))
    return Aligner(tiny_lm, make_sae(seed=1), 1, embedder=HashingEmbedder(), companions=[(make_sae(seed=2), 0)])


def test_zero_steps_give_the_starting_mix_back_and_the_unpushed_loss_is_the_models(tiny_lm: LoadedModel) -> None:
    layers = _layers(tiny_lm)
    ids, mask, pushed = tuning.topic_batch(tiny_lm.tokenizer, TEXTS, set(tiny_lm.tokenizer.all_special_ids))
    hooks = [dict(layer.block._forward_hooks) for layer in layers]
    weights, losses = tuning.tune_weights(tiny_lm.model, layers, ids, mask, pushed, 0)
    for w, layer in zip(weights, layers, strict=True):
        assert torch.allclose(w, layer.weights / layer.weights.max(), atol=1e-6)
    assert len(losses) == 1
    # the pushed loss differs from the unpushed one (the push is applied), and no hook is left behind
    unpushed = float(tuning.topic_loss(tiny_lm.model, ids, mask))
    assert abs(losses[0] - unpushed) > 1e-3
    assert [dict(layer.block._forward_hooks) for layer in layers] == hooks


def test_topic_loss_averages_each_texts_mean_token_loss(tiny_lm: LoadedModel) -> None:
    ids, mask, _ = tuning.topic_batch(tiny_lm.tokenizer, TEXTS[:3], set())
    per_text = []
    for text in TEXTS[:3]:
        one = torch.tensor([tiny_lm.tokenizer(text)["input_ids"]])
        logits = tiny_lm.model(input_ids=one).logits[0, :-1].float()
        per_text.append(float(torch.nn.functional.cross_entropy(logits, one[0, 1:])))
    assert float(tuning.topic_loss(tiny_lm.model, ids, mask)) == pytest.approx(np.mean(per_text), abs=1e-5)


def test_the_first_step_moves_each_log_weight_against_its_finite_difference_gradient(tiny_lm: LoadedModel) -> None:
    layers = _layers(tiny_lm)
    special = set(tiny_lm.tokenizer.all_special_ids)
    ids, mask, pushed = tuning.topic_batch(tiny_lm.tokenizer, TEXTS, special)
    lr = 1e-3
    weights, losses = tuning.tune_weights(tiny_lm.model, layers, ids, mask, pushed, 1, lr=lr)

    def loss_with(first: torch.Tensor) -> float:
        moved = [tuning.PushedLayer(layers[0].block, layers[0].decoder, first, layers[0].length), layers[1]]
        return tuning.tune_weights(tiny_lm.model, moved, ids, mask, pushed, 0)[1][0]

    eps = 1e-2
    start = layers[0].weights / layers[0].weights.max()
    grads = np.array([(loss_with(start * torch.exp(eps * torch.eye(8)[j]))
                       - loss_with(start * torch.exp(-eps * torch.eye(8)[j]))) / (2 * eps) for j in range(8)])
    # Adam's first step moves every log-weight by -lr x sign(gradient); the rescale to a largest weight of 1 then
    # shifts them all by one constant, so the coordinates the loss rises along end 2 lr below those it falls along
    moved = (torch.log(weights[0]) - torch.log(start)).numpy()
    strong = np.abs(grads) > 0.05 * np.abs(grads).max()
    rising, falling = moved[strong & (grads > 0)], moved[strong & (grads < 0)]
    assert len(rising) and len(falling)
    assert np.allclose(falling[:, None] - rising[None, :], 2 * lr, atol=lr / 10)
    assert losses[1] < losses[0]


def test_tuning_lowers_the_topic_loss_and_leaves_the_model_as_it_was(tiny_lm: LoadedModel) -> None:
    layers = _layers(tiny_lm)
    ids, mask, pushed = tuning.topic_batch(tiny_lm.tokenizer, TEXTS, set(tiny_lm.tokenizer.all_special_ids))
    before = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny_lm.model.named_parameters()}
    first = next(tiny_lm.model.parameters())
    first.requires_grad_(True)  # a user's flag survives tuning
    try:
        weights, losses = tuning.tune_weights(tiny_lm.model, layers, ids, mask, pushed, 8)
        assert first.requires_grad and first.grad is None
    finally:
        first.requires_grad_(flags[next(iter(flags))])
    assert losses[-1] < losses[0] - 0.01
    assert all((w > 0).all() and w.max() == 1 for w in weights)
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())
    # the same input gives the same mix
    again, _ = tuning.tune_weights(tiny_lm.model, layers, ids, mask, pushed, 8)
    assert all(torch.equal(a, b) for a, b in zip(weights, again, strict=True))


def test_load_or_tune_reads_its_cache_and_retunes_a_corrupt_one(tiny_lm: LoadedModel, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    layers = _layers(tiny_lm)
    special = set(tiny_lm.tokenizer.all_special_ids)
    key = {"model": "tiny"}
    first = tuning.load_or_tune(tiny_lm.model, layers, tiny_lm.tokenizer, special, TEXTS, 3, key, tmp_path)
    (path,) = tmp_path.glob("tuned-*.json")
    calls = []
    real = tuning.tune_weights
    monkeypatch.setattr(tuning, "tune_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = tuning.load_or_tune(tiny_lm.model, layers, tiny_lm.tokenizer, special, TEXTS, 3, key, tmp_path)
    assert not calls and all(torch.equal(a, b) for a, b in zip(first, cached, strict=True))
    saved = json.loads(path.read_text())
    saved["weights"][0][0] = -1.0  # not a weight a tuning can give
    path.write_text(json.dumps(saved))
    again = tuning.load_or_tune(tiny_lm.model, layers, tiny_lm.tokenizer, special, TEXTS, 3, key, tmp_path)
    assert calls == [1] and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # other steps, texts or layers are another file
    tuning.load_or_tune(tiny_lm.model, layers, tiny_lm.tokenizer, special, TEXTS, 4, key, tmp_path)
    assert len(list(tmp_path.glob("tuned-*.json"))) == 2


def test_generation_pushes_along_the_tuned_mix_at_every_layer(paired: Aligner) -> None:
    s = 0.6
    topic = _topic(paired.sae)
    plan = paired._plan(["the cat", "a dog runs"], topic, Spec("add", strength=s, tune_steps=3), 0, None, None)
    main = s * COMPANION_MAIN_SHARE
    units = paired.tuned_directions(paired.with_contrast(topic), main, Spec("add", strength=s, tune_steps=3))
    assert set(units) == {1, 0}
    rho = paired.steering_basis().residual_norm
    assert plan.hook is not None and plan.hook.direction is not None
    for row in plan.hook.direction:
        assert torch.allclose(row, units[1] * (main * rho), atol=1e-5)
    side = paired.companions[0].aligner
    ((side_hook, block),) = plan.companions
    assert block is side.block and side_hook.direction is not None
    want = units[0] * (main * DEFAULT_COMPANION_PUSH * side.steering_basis().residual_norm)
    assert torch.allclose(side_hook.direction[0], want, atol=1e-5)
    # tuned differs from untuned; zero steps is the untuned push exactly
    plain = paired._plan(["the cat", "a dog runs"], topic, Spec("add", strength=s, tune_steps=0), 0, None, None)
    assert plain.hook is not None and plain.hook.direction is not None
    assert not torch.allclose(plain.hook.direction[0], plan.hook.direction[0], atol=1e-4)
    zero = paired.tuned_directions(paired.with_contrast(topic), main, Spec("add", strength=s, tune_steps=0))
    assert torch.allclose(zero[1] * (main * rho), plain.hook.direction[0], atol=1e-5)


def test_a_topic_pushed_at_strength_zero_is_not_tuned_and_gets_no_push(paired: Aligner) -> None:
    plan = paired._plan(["the cat", "a dog"], _topic(paired.sae), Spec("add", tune_steps=2), 0, None, [0.0, 0.0])
    assert plan.hook is not None and plan.hook.direction is not None and not plan.hook.direction.any()
    assert all(hook.direction is not None and not hook.direction.any() for hook, _ in plan.companions)
    assert not paired._tuned


def test_auto_searches_the_untuned_mix_then_tunes_at_the_strength_it_chose(paired: Aligner) -> None:
    topic = _topic(paired.sae)
    spec = Spec("add", strength="auto", tune_steps=2, prompt_boost=1)  # on the tiny stack the x4 prompt finds none
    plan = paired._plan(["the cat", "a dog"], topic, spec, 0, None, None)
    chosen = paired.auto_strength(paired.with_contrast(topic), spec).strength
    assert plan.strengths == [chosen, chosen] and chosen > 0  # the tiny stack's search finds a strength
    main = chosen * COMPANION_MAIN_SHARE
    units = paired.tuned_directions(paired.with_contrast(topic), main, spec)
    assert plan.hook is not None and plan.hook.direction is not None
    assert torch.allclose(plan.hook.direction[0], units[1] * (main * paired.steering_basis().residual_norm), atol=1e-5)


def test_bad_tuning_requests_get_one_error_line(paired: Aligner, tiny_lm: LoadedModel) -> None:
    with pytest.raises(SaealignError, match="tune_steps tunes add's mix"):
        Spec("swap", tune_steps=3)
    with pytest.raises(SaealignError, match="whole number from 0 to"):
        Spec("add", tune_steps=-1)
    with pytest.raises(SaealignError, match="whole number from 0 to"):
        Spec("add", tune_steps=2.5)  # type: ignore[arg-type]
    assert Spec("swap").tune_steps == 0
    topic = _topic(paired.sae)
    with pytest.raises(SaealignError, match="one push per topic"):
        paired._plan(["the cat", "a dog"], topic, Spec("add", tune_steps=2), 0, None, [0.3, 0.6])
    with pytest.raises(SaealignError, match="no topic texts to tune"):
        paired.tuned_directions(_topic(paired.sae, []), 0.2, Spec("add", tune_steps=2))
    with pytest.raises(SaealignError, match="at least two tokens"):
        tuning.topic_batch(tiny_lm.tokenizer, ["dog", ""], set())
    with pytest.raises(SaealignError, match="positive length"):
        tuning.PushedLayer(layer_module(tiny_lm.model, 0), unit_decoder(make_sae())[:2], torch.ones(2), 0.0)
