"""strength="auto": the budget is kept, the choice is deterministic and cached, and auto equals its number."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import saealign.steering.strength as auto_mod
from conftest import make_llama, make_sae, make_tokenizer
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.reference.scoring import TopicScores
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering.aligner import Aligner
from saealign.steering.spec import GenerationSpec as Spec
from saealign.steering.strength import AutoStrengthConfig, continuation_nll, neutral_prompts

FAST = AutoStrengthConfig(n_prompts=4, max_new_tokens=4, strengths=(0.5, 1.0, 4.0, 8.0))
PROMPTS = ["the cat sat on the", "a dog ran to"]


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


def make(sae: SAE, cfg: AutoStrengthConfig = FAST) -> Aligner:
    lm = LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), name="tiny", key="tiny", load_seconds=0.0)
    aligner = Aligner(lm, sae, 0, embedder=HashingEmbedder())
    aligner.auto_config = cfg
    return aligner


def topic(sae: SAE, seed: int, value: float | None = None) -> TopicScores:
    d = sae.d_sae
    s = np.full(d, value, np.float32) if value is not None else np.random.default_rng(seed).random(d, np.float32)
    return TopicScores(s, np.zeros(d), np.full(d, 30), np.ones(d, bool), ["the dog sat on the mat"],
                       sae_key=sae_key(sae))


def test_choice_is_the_strongest_within_the_budget_of_the_monotone_fit(sae: SAE) -> None:
    for budget in (0.05, 0.5, 100.0):
        aligner = make(sae, AutoStrengthConfig(**{**FAST.__dict__, "budget": budget}))
        choice = aligner.auto_strength(topic(sae, 1))
        assert [t["strength"] for t in choice.trials] == sorted(FAST.strengths)  # every candidate measured
        fit = [t["ppl_ratio_fit"] for t in choice.trials]
        assert fit == auto_mod.isotonic([t["ppl_ratio"] for t in choice.trials])
        within = [t for t in choice.trials if t["ppl_ratio_fit"] <= 1 + budget and t["distance"] < choice.base_distance]
        assert choice.strength == (within[-1]["strength"] if within else 0.0)


def test_isotonic_fit_by_hand() -> None:
    assert auto_mod.isotonic([1.0, 0.8, 1.1, 1.5, 1.9, 1.8]) == pytest.approx([0.9, 0.9, 1.1, 1.5, 1.85, 1.85])
    assert auto_mod.isotonic([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    assert auto_mod.isotonic([1.0, 2.0]) == [1.0, 2.0] and auto_mod.isotonic([]) == []


def test_equal_scores_change_nothing_so_auto_keeps_steering_off(sae: SAE) -> None:
    # all weights equal: Swap selects what the SAE does, error mode is then the identity
    choice = make(sae).auto_strength(topic(sae, 0, value=0.5))
    assert [t["ppl_ratio"] for t in choice.trials] == [1.0] * len(FAST.strengths)
    assert all(t["distance"] == choice.base_distance for t in choice.trials)
    assert (choice.strength, choice.ppl_ratio, choice.gap_closed) == (0.0, 1.0, 0.0)
    assert "steering off" in choice.describe() or "-> 0" in choice.describe()


def test_auto_is_deterministic_cached_and_saved(sae: SAE, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    t1, t2 = topic(sae, 3), topic(sae, 3)
    a, b = make(sae).auto_strength(t1), make(sae).auto_strength(t2)
    assert (a.strength, a.trials, a.base_ppl) == (b.strength, b.trials, b.base_ppl)
    calls = []
    monkeypatch.setattr(auto_mod, "choose_strength", lambda *args: calls.append(args))  # the aligner imports it on use
    aligner = make(sae)
    assert aligner.auto_strength(t1).trials == a.trials and not calls  # cached on the topic
    loaded = TopicScores.load(t1.save(tmp_path / "scores"))
    assert aligner.auto_strength(loaded).to_json() == a.to_json() and not calls  # and saved with it


def test_generate_auto_equals_the_chosen_number(sae: SAE) -> None:
    aligner = make(sae)
    t = topic(sae, 5)
    auto = aligner.generate(PROMPTS, t, Spec(greedy=True, max_new_tokens=5))
    chosen = aligner.auto_strength(t).strength
    fixed = aligner.generate(PROMPTS, t, Spec(strength=chosen, greedy=True, max_new_tokens=5))
    assert [g.token_ids for g in auto] == [g.token_ids for g in fixed]
    assert [g.strength for g in auto] == [chosen, chosen]
    # methods that ignore the strength report 1.0
    assert aligner.generate(PROMPTS[:1], t, Spec("clamp" if aligner.index else "sae", max_new_tokens=2))[0].strength == 1.0


def test_rows_with_different_auto_strengths_share_one_batch(sae: SAE) -> None:
    aligner = make(sae, AutoStrengthConfig(**{**FAST.__dict__, "budget": 100.0}))
    topics = [topic(sae, 7), topic(sae, 11)]
    strengths = [aligner.auto_strength(t).strength for t in topics]
    both = aligner.generate(PROMPTS, topics, Spec(greedy=True, max_new_tokens=5), topic_per_row=[0, 1])
    for i, t in enumerate(topics):
        alone = aligner.generate(PROMPTS[i], t, Spec(strength=strengths[i], greedy=True, max_new_tokens=5))[0]
        assert both[i].token_ids == alone.token_ids and both[i].strength == strengths[i]
        assert both[i].token_contamination == pytest.approx(alone.token_contamination, abs=1e-6)


def test_continuation_nll_matches_the_logits(sae: SAE) -> None:
    lm = make(sae).lm
    prompt, new = [1, 5, 6, 7], [8, 9, 10]
    total, n = continuation_nll(lm, [prompt, [1, 4]], [new, [5]])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([prompt + new])).logits[0].float(), -1)
        logp2 = torch.log_softmax(lm.model(input_ids=torch.tensor([[1, 4, 5]])).logits[0].float(), -1)
    want = -sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(new)) - float(logp2[1, 5])
    assert n == 4 and math.isclose(total, want, rel_tol=1e-5)


def test_bad_input(sae: SAE) -> None:
    with pytest.raises(SaealignError, match="budget must be > 0"):
        AutoStrengthConfig(budget=0)
    with pytest.raises(SaealignError, match="positive"):
        AutoStrengthConfig(strengths=(1.0, -2.0))
    aligner = make(sae)
    with pytest.raises(SaealignError, match="number or 'auto'"):
        Spec(strength="strong")
    no_embedder = Aligner(aligner.lm, sae, 0)
    with pytest.raises(SaealignError, match="needs an embedder"):
        no_embedder.generate(PROMPTS, topic(sae, 1))
    assert no_embedder.generate(PROMPTS, topic(sae, 1), Spec(strength=1, max_new_tokens=2))  # a number needs none
    with pytest.raises(SaealignError, match="neutral prompts"):
        neutral_prompts(10_000)


def test_one_batch_search_equals_one_call_per_candidate(sae: SAE) -> None:
    aligner = make(sae)
    t = topic(sae, 9)
    choice = aligner.auto_strength(t)
    probe = aligner.neutral_probe(FAST)
    emb = aligner.embedder.embed(t.topic_texts)  # type: ignore[union-attr]
    for trial in choice.trials:
        spec = Spec(strength=trial["strength"], max_new_tokens=FAST.max_new_tokens, top_k=FAST.top_k)
        gens = aligner.generate(probe.prompts, t, spec, seed=FAST.seed)
        nll, n = continuation_nll(aligner.lm, probe.prompt_ids, [g.token_ids for g in gens])
        assert trial["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        assert trial["distance"] == pytest.approx(auto_mod._distance(aligner, [g.text for g in gens], emb), rel=1e-6)


def test_an_independent_judge_scores_the_text(sae: SAE, monkeypatch: pytest.MonkeyPatch) -> None:
    from saealign.evaluate.metrics import continuation_nll as text_nll
    from saealign.evaluate.metrics import perplexity

    judge = LoadedModel(model=make_llama(seed=7), tokenizer=make_tokenizer(), name="other-judge", key="judge",
                        load_seconds=0.0)
    monkeypatch.setattr(auto_mod, "load_model", lambda spec: judge if spec == "other-judge" else None)
    aligner = make(sae, AutoStrengthConfig(**{**FAST.__dict__, "judge": "other-judge"}))
    choice = aligner.auto_strength(topic(sae, 2))
    probe = aligner.neutral_probe(aligner.auto_config)
    base = aligner.generate(probe.prompts, spec=Spec("none", max_new_tokens=FAST.max_new_tokens, top_k=FAST.top_k),
                            seed=FAST.seed)
    assert choice.judge == "other-judge" and probe.judge is judge
    assert choice.base_ppl == pytest.approx(perplexity(text_nll(judge, probe.prompts, [g.text for g in base])))
    self_judged = make(sae).auto_strength(topic(sae, 2))
    assert self_judged.judge == "self" and self_judged.base_ppl != choice.base_ppl
