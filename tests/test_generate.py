"""Aligned generation: identities between methods, batch independence, seeds, streaming, errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import EOS_ID, PAD_ID, build_tiny_index, make_llama, make_sae, make_texts, make_tokenizer
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.reference.index import ReferenceIndex
from saealign.reference.scoring import TopicScores
from saealign.residual_stream import layer_module
from saealign.sae.autoencoder import SAE, SAEConfig, sae_key
from saealign.steering.aligner import Aligner, Generation, TokenEvent
from saealign.steering.decoding import Sampling, decode_steps, row_generator, sample_next
from saealign.steering.edits import Steering
from saealign.steering.hook import SteeringHook
from saealign.steering.spec import GenerationSpec as Spec

GREEDY = Spec(greedy=True, max_new_tokens=10)
PROMPTS = ["the cat sat on the", "a dog", "river water is cold and the sun shines over the big old house"]
N_NEW = 10


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), name="tiny", key="tiny", load_seconds=0.0)


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(scope="module")
def aligner(lm: LoadedModel, sae: SAE) -> Aligner:
    # the embedder lets strength="auto" (the default) measure distance to the topic texts
    return Aligner(lm, sae, 0, embedder=HashingEmbedder())


def topic_scores(sae: SAE, seed: int, value: float | None = None) -> TopicScores:
    """Hand-set scores: random in [0, 1] (or all ``value``), every latent scored."""
    d = sae.d_sae
    s = np.full(d, value, np.float32) if value is not None else np.random.default_rng(seed).random(d, np.float32)
    return TopicScores(s, np.zeros(d), np.full(d, 30), np.ones(d, bool), make_texts(2, seed=seed), sae_key=sae_key(sae))


def ids_of(gens: list[Generation]) -> list[list[int]]:
    return [g.token_ids for g in gens]


# -- identities ---------------------------------------------------------------------------------
def test_error_mode_sae_equals_no_steering(aligner: Aligner, sae: SAE) -> None:
    none = aligner.generate(PROMPTS, spec=Spec("none", greedy=True, max_new_tokens=N_NEW))
    plain = aligner.generate(PROMPTS, spec=Spec("sae", "error", greedy=True, max_new_tokens=N_NEW))
    assert ids_of(plain) == ids_of(none)
    assert all(g.contamination is None and g.token_contamination is None for g in none + plain)
    # with a topic both measure the same plain SAE activations σ(γ), and change nothing
    topic = topic_scores(sae, 0)
    measured_none = aligner.generate(PROMPTS, topic, Spec("none", greedy=True, max_new_tokens=N_NEW))
    measured_sae = aligner.generate(PROMPTS, topic, Spec("sae", greedy=True, max_new_tokens=N_NEW))
    assert ids_of(measured_none) == ids_of(none) == ids_of(measured_sae)
    for a, b in zip(measured_none, measured_sae, strict=True):
        assert a.token_contamination == b.token_contamination
        assert a.n_changed == b.n_changed == [0] * len(a.token_ids)
        assert a.topic_index == 0


def test_swap_with_all_scores_one_equals_sae(aligner: Aligner, sae: SAE) -> None:
    ones = topic_scores(sae, 0, value=1.0)
    plain = aligner.generate(PROMPTS, ones, Spec("sae", "replace", greedy=True, max_new_tokens=N_NEW))
    swap = aligner.generate(PROMPTS, ones, Spec("swap", "replace", greedy=True, max_new_tokens=N_NEW))
    none = aligner.generate(PROMPTS, spec=Spec("none", greedy=True, max_new_tokens=N_NEW))
    assert ids_of(swap) == ids_of(plain)
    assert ids_of(plain) != ids_of(none)  # replace mode does change the text: the identity is not vacuous
    for g in swap:
        assert g.n_changed == [0] * len(g.token_ids)
        assert g.token_contamination == [0.0] * len(g.token_ids)  # every active latent is fully aligned


def test_swap_changes_latents_and_contamination_is_per_token(aligner: Aligner, sae: SAE) -> None:
    gens = aligner.generate(PROMPTS, topic_scores(sae, 1), Spec("swap", strength=1, greedy=True, max_new_tokens=N_NEW))
    for g in gens:
        n = len(g.token_ids)
        assert len(g.tokens) == len(g.n_changed) == len(g.token_contamination or []) == n
        assert all(0.0 <= c <= 1.0 for c in g.token_contamination or [])
        assert g.contamination == pytest.approx(sum(g.token_contamination or []) / n)
        assert "".join(g.tokens) == g.text
        assert any(c > 0 for c in g.n_changed)
        if g.finish_reason == "eos":
            assert g.token_ids[-1] == EOS_ID and n <= N_NEW
        else:
            assert g.finish_reason == "length" and n == N_NEW and EOS_ID not in g.token_ids
        assert g.to_json()["token_contamination"] == g.token_contamination


# -- batch independence and seeds -----------------------------------------------------------------
@pytest.mark.parametrize(("method", "mode"), [("swap", "error"), ("weight", "error"), ("sae", "replace")])
def test_batch_equals_single_with_per_row_topics(aligner: Aligner, sae: SAE, method: str, mode: str) -> None:
    topics = [topic_scores(sae, 2), topic_scores(sae, 3)]
    per_row = [1, 0, 1]
    spec = Spec(method, mode, greedy=True, max_new_tokens=N_NEW)
    batch = aligner.generate(PROMPTS, topics, spec, topic_per_row=per_row)
    for prompt, t, got in zip(PROMPTS, per_row, batch, strict=True):
        alone = aligner.generate(prompt, topics[t], spec)[0]
        assert torch.equal(torch.tensor(got.token_ids), torch.tensor(alone.token_ids))
        np.testing.assert_allclose(got.token_contamination or [], alone.token_contamination or [], atol=1e-5)
        assert got.n_changed == alone.n_changed and got.text == alone.text
        assert got.topic_index == t
    # the two topics do steer differently: run every row on topic 0 instead
    same = aligner.generate(PROMPTS, topics[0], spec)
    assert [g.token_contamination for g in same] != [g.token_contamination for g in batch]


def test_sampling_is_seeded_per_prompt(aligner: Aligner, sae: SAE) -> None:
    topic = topic_scores(sae, 4)
    short = Spec(max_new_tokens=N_NEW)
    first = aligner.generate(PROMPTS, topic, short, seed=7)
    assert ids_of(aligner.generate(PROMPTS, topic, short, seed=7)) == ids_of(first)
    assert ids_of(aligner.generate(PROMPTS, topic, short, seed=8)) != ids_of(first)
    # a row samples the same tokens alone as in the batch
    assert aligner.generate(PROMPTS[1], topic, short, seed=7)[0].token_ids == first[1].token_ids
    twice = aligner.generate([PROMPTS[0]] * 2, topic, short, seed=[7, 9])
    assert twice[0].token_ids == first[0].token_ids and twice[1].token_ids != twice[0].token_ids
    assert [g.seed for g in twice] == [7, 9]
    greedy = aligner.generate(PROMPTS, topic, GREEDY, seed=7)
    assert ids_of(aligner.generate(PROMPTS, topic, GREEDY, seed=8)) == ids_of(greedy)


def test_rows_stop_at_eos_independently(sae: SAE) -> None:
    model = make_llama()  # a private copy: its generation config is changed below
    aligner = Aligner(LoadedModel(model, make_tokenizer(), "tiny", "tiny", 0.0), sae, 0)
    topic = topic_scores(sae, 8)
    plain = Spec("none", greedy=True, max_new_tokens=N_NEW)
    base = aligner.generate(PROMPTS, topic, plain)
    assert all(g.finish_reason == "length" for g in base)
    stop = base[0].token_ids[2]
    model.generation_config.eos_token_id = stop  # chat models end on their own end-of-turn token
    gens = aligner.generate(PROMPTS, topic, plain)
    assert gens[0].finish_reason == "eos" and gens[0].token_ids[-1] == stop and len(gens[0].token_ids) <= 3
    assert any(g.finish_reason == "length" for g in gens)
    for before, after in zip(base, gens, strict=True):
        cut = before.token_ids.index(stop) + 1 if stop in before.token_ids else N_NEW
        assert after.token_ids == before.token_ids[:cut]  # finished rows do not disturb the others
        assert after.token_contamination == before.token_contamination[:cut]  # type: ignore[index]


def test_sampling_draws_only_from_the_top_k() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, -1.0]]).repeat(200, 1)
    gens = [row_generator(0, str(i)) for i in range(200)]
    rows = list(range(200))
    assert set(sample_next(logits, Sampling(top_k=2), gens, rows).tolist()) == {1, 3}
    assert sample_next(logits, Sampling(top_k=1), gens, rows).tolist() == [1] * 200
    assert sample_next(logits, Sampling(greedy=True), gens, rows).tolist() == [1] * 200
    # a cold temperature puts (almost) all the mass on the best token: exp(-1 / 0.05) = 2e-9
    cold = sample_next(logits, Sampling(top_k=2, temperature=0.05), gens, rows)
    assert cold.tolist() == [1] * 200


# -- streaming and the prompt pass --------------------------------------------------------------
@pytest.mark.parametrize("greedy", [True, False])
def test_stream_yields_what_generate_returns(aligner: Aligner, sae: SAE, greedy: bool) -> None:
    topic = topic_scores(sae, 5)
    spec = Spec(greedy=greedy, max_new_tokens=N_NEW)
    gen = aligner.generate(PROMPTS[0], topic, spec, seed=3)[0]
    *events, last = aligner.stream(PROMPTS[0], topic, spec, seed=3)
    assert last == gen  # the stream ends with the Generation that generate returns
    assert all(isinstance(e, TokenEvent) for e in events)
    assert [e.token_id for e in events] == gen.token_ids
    assert [e.contamination for e in events] == gen.token_contamination
    assert [e.index for e in events] == list(range(len(gen.token_ids)))
    assert "".join(e.text for e in events) == gen.text


def test_abandoned_stream_leaves_no_hook(aligner: Aligner, lm: LoadedModel, sae: SAE) -> None:
    block = layer_module(lm.model, 0)
    hooks = dict(block._forward_hooks)
    stream = aligner.stream(PROMPTS[0], topic_scores(sae, 6), Spec("swap", "replace", max_new_tokens=N_NEW))
    next(stream)
    assert dict(block._forward_hooks) == hooks  # nothing stays attached between tokens
    del stream


def test_prompt_pass_keeps_padding_and_first_positions(lm: LoadedModel, sae: SAE) -> None:
    rows = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]  # type: ignore[operator]
    hook = SteeringHook(sae, Steering("swap", "replace"), topic_scores(sae, 7).as_tensor())
    steps = decode_steps(lm.model, rows, Sampling(max_new_tokens=3, greedy=True), [], PAD_ID, {EOS_ID}, hook,
                         layer_module(lm.model, 0))
    first = next(steps)
    recorded = hook.contamination[-1]  # the prompt pass
    width = max(map(len, rows))
    kept = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        kept[i, : width - len(r) + 1] = True  # padding + the first real position (BOS)
    assert torch.equal(recorded == 0, kept)
    assert torch.equal(first.contamination, recorded[:, -1])
    second = next(steps)
    assert hook.contamination[-1].shape == (len(rows), 1)
    assert torch.equal(second.contamination, hook.contamination[-1][:, 0])


# -- with a reference index ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index(lm: LoadedModel, sae: SAE, tmp_path_factory: pytest.TempPathFactory) -> ReferenceIndex:
    texts = make_texts(64, seed=1)
    return build_tiny_index(lm, sae, tmp_path_factory.mktemp("index"), texts, ["x"] * len(texts), shard_size=8)


def test_topic_texts_clamp_and_index_checks(lm: LoadedModel, sae: SAE, index: ReferenceIndex) -> None:
    full = Aligner(lm, sae, 0, index, HashingEmbedder())
    texts = ["the cat sat on the old house", "a big dog runs near the river"]
    scored = full.topic(texts)
    by_scores = full.generate(PROMPTS, scored, GREEDY)
    by_texts = full.generate(PROMPTS, texts, GREEDY)
    assert ids_of(by_texts) == ids_of(by_scores)
    assert [g.token_contamination for g in by_texts] == [g.token_contamination for g in by_scores]
    clamp = full.generate(PROMPTS, scored, Spec("clamp", greedy=True, max_new_tokens=N_NEW, clamp_n=3))
    # every token's 3 forced latents sit at 10x their reference maximum: never their current value
    assert all(g.n_changed == [3] * len(g.token_ids) for g in clamp)
    with pytest.raises(SaealignError, match="needs a reference index"):
        Aligner(lm, sae, 0).topic(texts)
    with pytest.raises(SaealignError, match="clamp needs"):
        Aligner(lm, sae, 0).generate(PROMPTS, scored, Spec("clamp"))
    with pytest.raises(SaealignError, match="built for SAE"):
        Aligner(lm, make_sae(seed=2), 0, index)
    with pytest.raises(SaealignError, match="re-score"):
        Aligner(lm, make_sae(seed=2), 0).generate(PROMPTS, scored)


# -- errors -----------------------------------------------------------------------------------------
def test_bad_input_raises_one_clear_error(aligner: Aligner, lm: LoadedModel, sae: SAE) -> None:
    topic = topic_scores(sae, 0)
    cases: list[tuple[dict, str]] = [
        ({"prompts": ["a dog", " \n"]}, "prompt 1 is empty"),
        ({"prompts": ""}, "prompt 0 is empty"),
        ({"prompts": []}, "no prompts"),
        ({"prompts": "a dog", "spec": Spec(max_new_tokens=126)}, "3 tokens and max_new_tokens is 126.*context of 128"),
        ({"prompts": "a dog", "topic": None}, "needs a topic"),
        ({"prompts": "a dog", "topic": topic_scores(sae, 0, value=0.0)}, "the topic scores no latent"),
        ({"prompts": PROMPTS, "topic": [topic, topic]}, "topic_per_row"),
        ({"prompts": PROMPTS, "topic": [topic, topic], "topic_per_row": [0, 2, 1]}, "topic_per_row"),
        ({"prompts": PROMPTS, "topic": [topic], "topic_per_row": [0]}, "topic_per_row"),
        ({"prompts": PROMPTS, "topic": [1, 2]}, "topic must be"),
        ({"prompts": PROMPTS, "topic": topic, "seed": [1, 2]}, "2 seeds for 3 prompts"),
        ({"prompts": PROMPTS, "topic": topic, "strength_per_row": [1.0]}, "1 strengths for 3 prompts"),
        ({"prompts": PROMPTS, "topic": topic, "strength_per_row": [1.0, 2.0, -1.0]}, "strength for add"),
        ({"prompts": "a dog", "topic": topic, "spec": Spec(chat=True)}, "no chat template"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SaealignError, match=message):
            aligner.generate(**kwargs)
    # a spec is checked when it is built, before any generation
    for fields, message in [({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": 0}, "top_k"),
                            ({"temperature": 0.0}, "temperature"), ({"method": "steer"}, "unknown steering method")]:
        with pytest.raises(SaealignError, match=message):
            Spec(**fields)
    # greedy needs no temperature; the longest prompt that fits the context is accepted
    fits = Spec(temperature=0.0, greedy=True, max_new_tokens=125, slot_push=0)
    assert len(aligner.generate("a dog", topic, fits)[0].token_ids) >= 1
    with pytest.raises(SaealignError, match=r"context of 128 tokens.*\(the concept slot's template counts"):
        aligner.generate("a dog", topic, replace(fits, slot_push=0.5))  # the template is read before the prompt
    with pytest.raises(SaealignError, match="hidden size"):
        Aligner(lm, SAE(SAEConfig(d_in=32, d_sae=64, activation="relu")), 0)
    with pytest.raises(SaealignError, match="out of range"):
        Aligner(lm, sae, 5)


def test_chat_template_wraps_the_prompt(lm: LoadedModel, sae: SAE) -> None:
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} <s>{% endif %}"
    chat = Aligner(LoadedModel(lm.model, tok, "tiny-chat", "tiny", 0.0), sae, 0)
    wrapped = chat.generate("a dog", spec=Spec("none", greedy=True, max_new_tokens=4, chat=True))[0]
    manual = chat.generate("a dog </s> <s>", spec=Spec("none", greedy=True, max_new_tokens=4))[0]  # + the BOS
    assert wrapped.token_ids == manual.token_ids and wrapped.prompt == "a dog"


@pytest.mark.parametrize("steer_prompt", [True, False])
def test_steer_prompt_false_edits_only_positions_that_predict_new_tokens(lm: LoadedModel, sae: SAE,
                                                                         steer_prompt: bool) -> None:
    rows = [[1, 5, 6, 7, 8], [1, 9, 10]]  # left padding puts both last prompt tokens in the last column
    hook = SteeringHook(sae, Steering("swap", "error"), topic_scores(sae, 3).as_tensor())
    steps = decode_steps(lm.model, rows, Sampling(3, greedy=True), [row_generator(0, "x")] * 2, PAD_ID, {EOS_ID},
                         hook, layer_module(lm.model, 0), steer_prompt=steer_prompt)
    next(steps)
    prompt_pass = hook.n_changed[-1]  # [batch, prompt width] of the prompt pass
    assert bool((prompt_pass[:, -1] > 0).all())  # the last prompt position is always edited
    edited_before = bool((prompt_pass[:, :-1] > 0).any())
    assert edited_before == steer_prompt  # earlier prompt positions only when the prompt is steered
    next(steps)
    assert bool((hook.n_changed[-1] > 0).all())  # generated positions are always edited
