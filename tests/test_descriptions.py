"""Latent descriptions (what each latent makes the model say) and the output match built on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import saealign.steering.descriptions as descriptions
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.reference.scoring import TopicScores
from saealign.residual_stream import layer_module
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering import directions
from saealign.steering.aligner import Aligner
from saealign.steering.spec import GenerationSpec as Spec

PROMPTS = ["the cat sat on the", "a dog runs near the river"]


@pytest.fixture
def sae(tiny_sae: SAE) -> SAE:
    return tiny_sae


@pytest.fixture
def lm(tiny_lm: LoadedModel) -> LoadedModel:
    return tiny_lm


def test_describe_keeps_distinct_whole_words_in_order(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    ids = np.array([tok.convert_tokens_to_ids(["cat", "<s>", "the", "a", "cat", "dog"]),
                    tok.convert_tokens_to_ids(["a", "of", "to", "<pad>", "in", "is"])])
    # "a", "of", "to", "in", "is" and the specials are shorter than a three-letter word: left out
    assert descriptions.describe(tok, ids) == ["cat the dog", ""]


@torch.inference_mode()
def test_promoted_tokens_match_full_forwards_by_hand(lm: LoadedModel, sae: SAE) -> None:
    rho, scale = 3.0, 0.5
    got = descriptions.promoted_tokens(lm, sae, 0, PROMPTS, rho, scale=scale, n_tokens=4, chunk=7, progress=False)
    assert got.shape == (sae.d_sae, 4)
    block = layer_module(lm.model, 0)
    unit = directions.unit_decoder(sae)
    for latent in (0, 13, sae.d_sae - 1):
        total = torch.zeros(lm.model.config.vocab_size)
        for prompt in PROMPTS:
            ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
            base = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].float(), -1)

            def push(_m, _i, out, v=unit[latent] * (scale * rho)):  # noqa: ANN001, ANN202
                hidden = out[0] if isinstance(out, tuple) else out
                hidden = hidden.clone()
                hidden[:, -1] += v  # the last position alone, as the KV-cached probe does
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

            handle = block.register_forward_hook(push)
            try:
                pushed = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].float(), -1)
            finally:
                handle.remove()
            total += pushed - base
        top = total.topk(4)
        assert top.values[-1] - total.topk(5).values[-1] > 1e-4, "a near-tie would make the order arbitrary"
        assert list(got[latent]) == top.indices.tolist()


def test_output_match_by_hand() -> None:
    embeddings = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 0, 0]], dtype=np.float32)
    topic = np.array([[1, 0, 0], [0.8, 0.6, 0]], dtype=np.float64)  # mean (0.9, 0.3, 0)
    centre = np.array([0.9, 0.3, 0]) / np.linalg.norm([0.9, 0.3, 0])
    sim = embeddings[:4] @ centre  # the undescribed last latent takes no part in the median
    want = np.maximum(sim - np.median(sim), 0)
    got = descriptions.output_match(embeddings, topic)
    np.testing.assert_allclose(got[:4], want, rtol=1e-6)
    assert got[4] == 0 and got[3] == 0 and got[0] > got[2] > 0
    with pytest.raises(SaealignError, match="cancel out"):
        descriptions.output_match(embeddings, np.array([[1, 0, 0], [-1, 0, 0]]))
    with pytest.raises(SaealignError, match="no latent"):
        descriptions.output_match(np.zeros((3, 3)), topic)


def test_descriptions_are_cached_and_a_corrupt_file_is_measured_anew(lm: LoadedModel, sae: SAE, tmp_path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = descriptions.load_or_measure_descriptions(lm, sae, 0, PROMPTS, 3.0, folder=tmp_path, progress=False)
    assert len(first.words) == sae.d_sae and first.token_ids.shape == (sae.d_sae, descriptions.DESCRIBE["tokens"])
    assert first.words == descriptions.describe(lm.tokenizer, first.token_ids)
    (path,) = tmp_path.glob("descriptions-*.json")
    measured = descriptions.promoted_tokens
    monkeypatch.setattr(descriptions, "promoted_tokens", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    again = descriptions.load_or_measure_descriptions(lm, sae, 0, PROMPTS, 3.0, folder=tmp_path, progress=False)
    assert np.array_equal(again.token_ids, first.token_ids) and again.words == first.words
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "words": data["words"][:-1]}))
    with pytest.raises(AssertionError, match="measured"):  # the short file is not trusted
        descriptions.load_or_measure_descriptions(lm, sae, 0, PROMPTS, 3.0, folder=tmp_path, progress=False)
    monkeypatch.setattr(descriptions, "promoted_tokens", measured)
    mended = descriptions.load_or_measure_descriptions(lm, sae, 0, PROMPTS, 3.0, folder=tmp_path, progress=False)
    assert mended.words == first.words  # measured again and rewritten
    assert json.loads(path.read_text())["words"] == first.words


def test_description_embeddings_embed_each_description_once(lm: LoadedModel, sae: SAE, tmp_path) -> None:
    found = descriptions.LatentDescriptions(np.zeros((3, 2), np.int64), ["cat dog", "", "river"], "k")
    embedder = HashingEmbedder(dim=16)
    got = descriptions.description_embeddings(found, embedder, folder=tmp_path, progress=False)
    want = embedder.embed(["cat dog", "river"]).astype(np.float16).astype(np.float32)
    assert np.array_equal(got[[0, 2]], want) and not got[1].any()

    class Counting(HashingEmbedder):
        calls = 0

        def embed(self, texts, batch_size=64, progress=False):  # noqa: ANN001, ANN201
            Counting.calls += 1
            return super().embed(texts)

    again = descriptions.description_embeddings(found, Counting(dim=16), folder=tmp_path, progress=False)
    assert np.array_equal(again, got) and Counting.calls == 0  # same embedder fingerprint: read from disk
    (path,) = tmp_path.glob("description-embeddings-*.npy")
    path.write_bytes(b"not an array")
    mended = descriptions.description_embeddings(found, Counting(dim=16), folder=tmp_path, progress=False)
    assert np.array_equal(mended, got) and Counting.calls == 1


def test_a_latent_without_output_match_is_left_out_of_the_direction(sae: SAE) -> None:
    s = torch.zeros(sae.d_sae)
    s[[3, 7, 11]] = torch.tensor([1.0, 0.5, 0.25])
    match = torch.zeros(sae.d_sae)
    match[[3, 7]] = torch.tensor([0.1, 0.4])
    unit = directions.unit_decoder(sae)
    want = 1.0 * 0.1 * unit[3] + 0.5 * 0.4 * unit[7]
    got = directions.topic_direction(sae, s, n_latents=8, match=match)
    assert torch.allclose(got, want / want.norm(), atol=1e-6)


def test_generation_reads_the_output_match_and_needs_an_embedder(lm: LoadedModel, sae: SAE, tmp_path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))
    scores = np.random.default_rng(0).random(sae.d_sae).astype(np.float32)
    topic = TopicScores(scores, np.zeros(sae.d_sae), np.full(sae.d_sae, 30), np.ones(sae.d_sae, bool),
                        ["the dog runs near the river", "a big dog and a small cat"], sae_key=sae_key(sae))
    aligner = Aligner(lm, sae, 0, embedder=HashingEmbedder())
    spec = Spec("add", strength=1, greedy=True, max_new_tokens=5, contrast=False)
    match = aligner.output_match(topic)
    embeddings = descriptions.description_embeddings(aligner.latent_descriptions(), HashingEmbedder())
    want = descriptions.output_match(embeddings, HashingEmbedder().embed(topic.topic_texts))
    assert np.array_equal(match, want) and (match > 0).any()
    plan = aligner._plan(["the cat"], topic, spec, 0, None, None)
    basis = aligner.steering_basis()
    by_hand = directions.topic_direction(sae, torch.as_tensor(scores), spec.n_latents,
                                         torch.as_tensor(basis.output_scores), None, torch.as_tensor(match))
    assert plan.hook is not None and plan.hook.direction is not None
    assert torch.allclose(plan.hook.direction[0], by_hand * basis.residual_norm, atol=1e-5)
    off = aligner._plan(["the cat"], topic, Spec("add", strength=1, contrast=False, output_match=False), 0, None, None)
    assert off.hook is not None and not torch.allclose(off.hook.direction[0], plan.hook.direction[0], atol=1e-3)
    bare = Aligner(lm, sae, 0)
    with pytest.raises(SaealignError, match="output_match=False"):
        bare.generate(["the cat"], topic, spec)
    assert bare.generate(["the cat"], topic, Spec("add", strength=1, greedy=True, max_new_tokens=5, contrast=False,
                                                  output_match=False))


def test_a_model_without_an_unembedding_is_one_error(lm: LoadedModel, sae: SAE, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm.model, "get_output_embeddings", lambda: None)
    with pytest.raises(SaealignError, match="no output embedding"):
        descriptions.promoted_tokens(lm, sae, 0, PROMPTS, 3.0, progress=False)
