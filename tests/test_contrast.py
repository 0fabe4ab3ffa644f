"""Activation contrast (topic texts vs the reference corpus): by hand, in directions, saved with the topic, in the Aligner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import saealign.steering.directions as directions
from conftest import build_tiny_index, make_sae, make_texts
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.contrast import activation_contrast, mean_activation, mean_activations
from saealign.reference.embed import HashingEmbedder
from saealign.reference.index import ReferenceIndex
from saealign.reference.scoring import TopicScores
from saealign.reference.statistics import prompt_statistics
from saealign.residual_stream import content_mask, layer_module, residuals_at, special_token_ids
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering.aligner import Aligner
from saealign.steering.plan import directions_for
from saealign.steering.spec import GenerationSpec as Spec
from saealign.steering.strength import neutral_prompts

TEXTS = ["the cat sat on the old house", "a big dog runs near the river", "the dog ran"]


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(scope="module")
def lm(tiny_lm: LoadedModel) -> LoadedModel:
    return tiny_lm


@pytest.fixture(scope="module")
def index(lm: LoadedModel, sae: SAE, tmp_path_factory: pytest.TempPathFactory) -> ReferenceIndex:
    texts = make_texts(48, seed=3)
    return build_tiny_index(lm, sae, tmp_path_factory.mktemp("index"), texts, ["x"] * len(texts), shard_size=8)


def by_hand_mean(lm: LoadedModel, sae: SAE, texts: list[str], skip: int | None = None) -> np.ndarray:
    """One text at a time, no batching: the SAE's activations summed over content tokens (but position ``skip``),
    over their count."""
    total, count = np.zeros(sae.d_sae), 0
    for t in texts:
        ids = torch.tensor([lm.tokenizer(t)["input_ids"]])
        keep = content_mask(ids, torch.ones_like(ids), special_token_ids(lm.tokenizer))[0]
        if skip is not None:
            keep[skip] = False
        acts = sae.encode(residuals_at(lm.model, 0, ids, torch.ones_like(ids))[0][keep]).double()
        total += acts.sum(0).numpy()
        count += int(keep.sum())
    return total / count


def test_mean_activation_by_hand(lm: LoadedModel, sae: SAE) -> None:
    got = mean_activation(lm, sae, 0, TEXTS)
    np.testing.assert_allclose(got, by_hand_mean(lm, sae, TEXTS), rtol=1e-5, atol=1e-6)
    with pytest.raises(SaealignError, match="no content tokens"):
        mean_activation(lm, sae, 0, [""])


def test_one_pass_over_several_layers_is_each_layers_own_mean(lm: LoadedModel, sae: SAE) -> None:
    """The main and companion layers' means read in one pass are, bit for bit, what a pass per layer reads."""
    other = make_sae(seed=5)
    texts = [*TEXTS, *make_texts(40, seed=2)]  # more than one batch of 32
    both = mean_activations(lm, [(sae, 1), (other, 0)], texts)
    assert np.array_equal(both[0], mean_activation(lm, sae, 1, texts))
    assert np.array_equal(both[1], mean_activation(lm, other, 0, texts))
    np.testing.assert_allclose(both[1], by_hand_mean(lm, other, texts), rtol=1e-5, atol=1e-7)
    assert not np.array_equal(both[0], both[1])


def test_mean_activation_leaves_out_a_later_attention_sink(lm: LoadedModel, sae: SAE) -> None:
    # blow the residual at the third position up 1000-fold in every text, as a second attention sink would:
    # the mean is then the by-hand mean without that position, while the index's statistics keep it
    def sink(_mod: object, _inp: object, output: object) -> object:
        hidden = (output if isinstance(output, torch.Tensor) else output[0]).clone()  # type: ignore[index]
        hidden[:, 2] *= 1000
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])  # type: ignore[index]

    handle = layer_module(lm.model, 0).register_forward_hook(sink)
    try:
        got = mean_activation(lm, sae, 0, TEXTS)
        expected = by_hand_mean(lm, sae, TEXTS, skip=2)
        act_sum, _, _, n_tokens = prompt_statistics(lm, sae, 0, TEXTS)  # as the index is built
    finally:
        handle.remove()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    kept = np.asarray(act_sum.sum(axis=0)).ravel() / n_tokens.sum()
    assert kept.max() > 100 * max(got.max(), 1e-6)


def test_contrast_is_the_clipped_difference() -> None:
    topic, ref = np.array([0.5, 0.1, 0.0, 2.0]), np.array([0.2, 0.3, 0.0, 2.0])
    assert activation_contrast(topic, ref).tolist() == pytest.approx([0.3, 0.0, 0.0, 0.0])
    with pytest.raises(SaealignError, match="cover 4 latents but the reference's 3"):
        activation_contrast(topic, ref[:3])
    with pytest.raises(SaealignError, match="not finite"):
        activation_contrast(topic, np.array([np.nan, 0, 0, 0]))


def test_index_mean_activation_is_total_over_tokens(index: ReferenceIndex, lm: LoadedModel, sae: SAE) -> None:
    # the index's exact per-latent totals over its content tokens = the mean of the corpus measured directly
    np.testing.assert_allclose(index.mean_activation, mean_activation(lm, sae, 0, index.texts), rtol=1e-4, atol=1e-6)


def test_direction_weighs_by_contrast(sae: SAE) -> None:
    s = torch.zeros(sae.d_sae)
    s[[3, 7, 11]] = torch.tensor([1.0, 0.5, 0.25])
    contrast = torch.zeros(sae.d_sae)
    contrast[[3, 11]] = torch.tensor([0.5, 2.0])  # latent 7 fires no more on the topic than on the reference
    unit = directions.unit_decoder(sae)
    want = 0.5 * unit[3] + 0.5 * unit[11]  # 1 x 0.5 and 0.25 x 2
    got = directions.topic_direction(sae, s, 8, None, contrast)
    assert torch.allclose(got, want / want.norm(), atol=1e-6)
    with pytest.raises(SaealignError, match="nothing to steer along"):
        directions.topic_direction(sae, s, 8, None, torch.zeros(sae.d_sae))


def test_contrast_is_saved_with_the_topic_and_checked(tmp_path: Path, sae: SAE) -> None:
    n = sae.d_sae
    contrast = np.linspace(0, 1, n, dtype=np.float32)
    t = TopicScores(np.full(n, 0.5, np.float32), np.zeros(n), np.full(n, 30), np.ones(n, bool), TEXTS,
                    sae_key=sae_key(sae), contrast=contrast)
    back = TopicScores.load(t.save(tmp_path / "t"))
    assert np.array_equal(back.contrast, contrast)
    plain = TopicScores.load(TopicScores(t.scores, t.g, t.n_prompts, t.scored, TEXTS).save(tmp_path / "plain"))
    assert plain.contrast is None  # files without it (older ones) still load
    with pytest.raises(SaealignError, match="non-negative"):
        TopicScores(t.scores, t.g, t.n_prompts, t.scored, TEXTS, contrast=-contrast - 1)
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(tmp_path / "t" / "scores.safetensors"))
    save_file(arrays | {"contrast": np.full(n, np.nan, np.float32)}, str(tmp_path / "t" / "scores.safetensors"))
    with pytest.raises(SaealignError, match="corrupt"):
        TopicScores.load(tmp_path / "t")


def test_aligner_fills_contrast_from_the_index_and_the_models_own_text(lm: LoadedModel, sae: SAE,
                                                                        index: ReferenceIndex) -> None:
    full = Aligner(lm, sae, 0, index, HashingEmbedder())
    own = full.default_texts()
    prompts = neutral_prompts(16)
    assert len(own) == 4 * len(prompts) and all(t.startswith(p) for t, p in zip(own, prompts * 4, strict=True))
    assert len(set(own)) > len(prompts)  # the seeds sample different continuations
    own_mean = by_hand_mean(lm, sae, own)
    np.testing.assert_allclose(full.steering_basis().default_mean, own_mean, rtol=1e-4, atol=1e-6)
    # the reference is, per latent, the larger of the corpus's and the model's own text's mean activation
    reference = np.maximum(index.mean_activation, own_mean)
    assert (index.mean_activation > own_mean + 1e-4).any() and (own_mean > index.mean_activation + 1e-4).any()
    np.testing.assert_allclose(full.reference_mean(), reference, rtol=1e-4, atol=1e-6)
    topic = full.topic(TEXTS)
    np.testing.assert_allclose(topic.contrast, np.maximum(by_hand_mean(lm, sae, TEXTS) - reference, 0),
                               rtol=1e-4, atol=1e-6)

    bare = Aligner(lm, sae, 0)  # no index: the model's own text alone is the reference
    stripped = TopicScores(topic.scores, topic.g, topic.n_prompts, topic.scored, TEXTS, sae_key=topic.sae_key)
    spec = Spec("add", strength=0.5, greedy=True, max_new_tokens=3, output_match=False)  # no embedder either
    bare.generate(["the cat"], stripped, spec)
    np.testing.assert_allclose(stripped.contrast, np.maximum(by_hand_mean(lm, sae, TEXTS) - own_mean, 0),
                               rtol=1e-4, atol=1e-6)

    # without an Aligner, a topic that carries no contrast is one clear error (or steer without it)
    bare_topic = TopicScores(topic.scores, topic.g, topic.n_prompts, topic.scored, TEXTS)
    basis = directions.SteeringBasis(np.ones(sae.d_sae, np.float32), 1.0, "k", np.zeros(sae.d_sae, np.float32))
    with pytest.raises(SaealignError, match="carry no activation contrast"):
        directions_for(sae, spec, [bare_topic], [0], [0.5], basis)
    with pytest.raises(SaealignError, match="needs each topic's output match"):
        directions_for(sae, Spec("add", contrast=False), [bare_topic], [0], [0.5], basis)
    plain = Spec("add", contrast=False, output_match=False)
    assert directions_for(sae, plain, [bare_topic], [0], [0.5], basis).shape == (1, sae.d_in)
