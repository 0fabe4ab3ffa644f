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
from saealign.steering.strength import AutoStrengthConfig, neutral_prompts, token_nlls

FAST = AutoStrengthConfig(n_prompts=4, max_new_tokens=4, strengths=(0.2, 0.5, 1.0, 2.0))  # in every method's range
PROMPTS = ["the cat sat on the", "a dog ran to"]


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The additive methods cache the tiny model's steering basis: keep it out of the user's cache."""
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path_factory.getbasetemp() / "auto-cache"))


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


def test_choice_meets_the_budget_on_the_fitted_curve(sae: SAE) -> None:
    for budget in (0.05, 0.5, 100.0):
        aligner = make(sae, AutoStrengthConfig(**{**FAST.__dict__, "budget": budget}))
        choice = aligner.auto_strength(topic(sae, 1))
        tried = FAST.candidates("add", Spec().boost)  # those whose boosted prompt push stays in add's range
        assert [t["strength"] for t in choice.trials] == list(tried)  # every one measured
        a, b = choice.fit
        assert (a, b) == auto_mod.fit_curve([t["strength"] for t in choice.trials], [t["log_ratio"] for t in choice.trials])
        want = auto_mod.solve_budget(a, b, budget, max(tried))
        s = np.array([t["strength"] for t in choice.trials])
        slope = float(s @ (np.array([t["distance"] for t in choice.trials]) - choice.base_distance) / (s @ s))
        if slope < 0:
            assert choice.strength == pytest.approx(want, abs=1e-4)
            assert a * want + b * want**2 <= math.log1p(budget) + 1e-9
            assert choice.distance == pytest.approx(choice.base_distance + slope * choice.strength, rel=1e-4)
        else:
            assert choice.strength == 0.0 and "steering off" in choice.note
            assert choice.distance == choice.base_distance


def test_distance_slope_is_least_squares_through_the_unsteered_distance() -> None:
    # distances 1.0 - 0.5 s exactly: slope -0.5; one noisy candidate above the base no longer decides alone
    assert auto_mod.distance_slope([0.1, 0.2, 0.4], [0.95, 0.9, 0.8], 1.0) == pytest.approx(-0.5)
    assert auto_mod.distance_slope([0.15, 0.3, 0.45, 0.6], [1.26, 1.13, 1.13, 1.13], 1.21) < 0  # law, run 4
    assert auto_mod.distance_slope([0.1, 0.2], [1.1, 1.3], 1.0) == pytest.approx((0.01 + 0.06) / 0.05)


def test_fit_and_solve_are_exact_on_a_quadratic() -> None:
    s = [0.1, 0.2, 0.3, 0.45, 0.6]
    a, b = auto_mod.fit_curve(s, [0.2 * x + 0.9 * x * x for x in s])
    assert (a, b) == pytest.approx((0.2, 0.9), abs=1e-9)
    x = auto_mod.solve_budget(a, b, 0.1, 10.0)
    assert a * x + b * x * x == pytest.approx(math.log1p(0.1))
    assert auto_mod.solve_budget(0.0, 0.0, 0.1, 0.6) == 0.6  # no cost at all: the largest candidate
    assert auto_mod.solve_budget(1.0, 0.0, 0.1, 0.6) == pytest.approx(math.log1p(0.1))
    # negative slopes are not allowed: a noisy candidate cheaper than unsteered cannot make cost fall with strength
    assert auto_mod.fit_curve([1.0, 2.0], [-0.1, -0.3]) == (0.0, 0.0)


def test_read_log_ratio_separates_lasting_from_one_off_cost() -> None:
    # probe of 24 tokens: halves of 12; base mean NLL 1.0 / 1.0, steered 1.5 / 1.2
    rate, switch, log_ratio = auto_mod.read_log_ratio((1.0, 1.0), (1.5, 1.2), 24, 64)
    assert rate == pytest.approx(0.2) and switch == pytest.approx(0.5 * 12 - 0.2 * 12)
    assert log_ratio == pytest.approx(0.2 + 3.6 / 64)
    # a pure one-off cost reads smaller the longer the text
    assert auto_mod.read_log_ratio((1.0, 1.0), (1.5, 1.0), 24, 64)[2] == pytest.approx(6 / 64)
    assert auto_mod.read_log_ratio((1.0, 1.0), (0.5, 0.8), 24, 64) == (0.0, 0.0, 0.0)  # cheaper text costs nothing
    assert auto_mod.halves([np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0])], 4) == (8 / 3, 3.5)


def test_auto_is_deterministic_cached_and_saved(sae: SAE, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    t1, t2 = topic(sae, 3), topic(sae, 3)
    a, b = make(sae).auto_strength(t1), make(sae).auto_strength(t2)
    assert (a.strength, a.trials, a.fit) == (b.strength, b.trials, b.fit)
    calls = []
    monkeypatch.setattr(auto_mod, "choose_strength", lambda *args: calls.append(args))  # the aligner imports it on use
    aligner = make(sae)
    assert aligner.auto_strength(t1).trials == a.trials and not calls  # cached on the topic
    loaded = TopicScores.load(t1.save(tmp_path / "scores"))
    assert aligner.auto_strength(loaded).to_json() == a.to_json() and not calls  # and saved with it


def test_generate_auto_equals_the_chosen_number(sae: SAE) -> None:
    aligner = make(sae)
    t = topic(sae, 5)
    auto = aligner.generate(PROMPTS, t, Spec(strength="auto", greedy=True, max_new_tokens=5))
    chosen = aligner.auto_strength(t).strength
    fixed = aligner.generate(PROMPTS, t, Spec(strength=chosen, greedy=True, max_new_tokens=5))
    assert [g.token_ids for g in auto] == [g.token_ids for g in fixed]
    assert [g.strength for g in auto] == [chosen, chosen]
    # methods that ignore the strength report 1.0
    assert aligner.generate(PROMPTS[:1], t, Spec("clamp" if aligner.index else "sae", max_new_tokens=2))[0].strength == 1.0


def test_rows_with_different_auto_strengths_share_one_batch(sae: SAE) -> None:
    aligner = make(sae, AutoStrengthConfig(**{**FAST.__dict__, "budget": 100.0}))
    topics = [topic(sae, 7), topic(sae, 11)]
    strengths = [aligner.auto_strength(t, Spec(strength="auto", greedy=True)).strength for t in topics]
    both = aligner.generate(PROMPTS, topics, Spec(strength="auto", greedy=True, max_new_tokens=5), topic_per_row=[0, 1])
    for i, t in enumerate(topics):
        alone = aligner.generate(PROMPTS[i], t, Spec(strength=strengths[i], greedy=True, max_new_tokens=5))[0]
        assert both[i].token_ids == alone.token_ids and both[i].strength == strengths[i]
        assert both[i].token_contamination == pytest.approx(alone.token_contamination, abs=1e-6)


def test_token_nlls_match_the_logits(sae: SAE) -> None:
    lm = make(sae).lm
    prompt, new = [1, 5, 6, 7], [8, 9, 10]
    nlls = token_nlls(lm, [prompt, [1, 4]], [new, [5]])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([prompt + new])).logits[0].float(), -1)
        logp2 = torch.log_softmax(lm.model(input_ids=torch.tensor([[1, 4, 5]])).logits[0].float(), -1)
    want = [-float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(new)]
    assert nlls[0] == pytest.approx(want, rel=1e-5) and nlls[1] == pytest.approx([-float(logp2[1, 5])], rel=1e-5)


def test_bad_input(sae: SAE) -> None:
    with pytest.raises(SaealignError, match="budget must be a finite number > 0"):
        AutoStrengthConfig(budget=0)
    with pytest.raises(SaealignError, match="positive"):
        AutoStrengthConfig(strengths=(1.0, -2.0))
    aligner = make(sae)
    with pytest.raises(SaealignError, match="number or 'auto'"):
        Spec(strength="strong")
    no_embedder = Aligner(aligner.lm, sae, 0)
    with pytest.raises(SaealignError, match="needs an embedder"):
        no_embedder.generate(PROMPTS, topic(sae, 1), Spec(strength="auto"))
    with pytest.raises(SaealignError, match="output_match=False"):  # the output match embeds the topic texts
        no_embedder.generate(PROMPTS, topic(sae, 1), Spec(strength=1, max_new_tokens=2))
    # a number without the output match needs no embedder
    assert no_embedder.generate(PROMPTS, topic(sae, 1), Spec(strength=1, max_new_tokens=2, output_match=False))
    with pytest.raises(SaealignError, match="neutral prompts"):
        neutral_prompts(10_000)
    with pytest.raises(SaealignError, match="needs a method that reads a strength"):
        aligner.auto_strength(topic(sae, 1), Spec("clamp"))


def test_one_batch_search_equals_one_call_per_candidate(sae: SAE) -> None:
    aligner = make(sae)
    t = topic(sae, 9)
    choice = aligner.auto_strength(t)
    probe = aligner.neutral_probe(FAST)
    emb = aligner.embedder.embed(t.topic_texts)  # type: ignore[union-attr]
    for trial in choice.trials:
        spec = Spec(strength=trial["strength"], max_new_tokens=FAST.max_new_tokens, top_k=FAST.top_k)
        gens = aligner.generate(probe.prompts, t, spec, seed=FAST.seed)
        steered = auto_mod.halves(token_nlls(aligner.lm, probe.prompt_ids, [g.token_ids for g in gens]),
                                  FAST.max_new_tokens)
        want = auto_mod.read_log_ratio(probe.halves, steered, FAST.max_new_tokens, FAST.read_tokens)
        assert (trial["rate"], trial["switch"], trial["log_ratio"]) == pytest.approx(want, abs=1e-6)
        assert trial["distance"] == pytest.approx(auto_mod._distance(aligner, [g.text for g in gens], emb), rel=1e-6)


def test_candidates_keep_the_boosted_prompt_push_in_range() -> None:
    cfg = AutoStrengthConfig()
    assert cfg.candidates("add") == (0.15, 0.3, 0.45, 0.6)
    # a boosted prompt: the grid divided by the boost, so the prompt's pushes span the constant push's
    assert cfg.candidates("add", prompt_boost=4) == (0.0375, 0.075, 0.1125, 0.15)
    assert cfg.candidates("add", prompt_boost=0.5) == cfg.candidates("add")
    assert cfg.candidates("add", prompt_boost=10) == (0.015, 0.03, 0.045, 0.06)
    named = AutoStrengthConfig(strengths=(0.15, 0.3, 0.45, 0.6))  # named candidates are taken as they are
    assert named.candidates("add", prompt_boost=4) == (0.15, 0.3, 0.45)  # 0.6 x 4 would push the prompt past 2
    assert named.candidates("add", prompt_boost=10) == (0.15,)  # at most 2 / 10
    with pytest.raises(SaealignError, match="no candidate strength"):
        AutoStrengthConfig(strengths=(0.3,)).candidates("add", prompt_boost=10)


def test_the_search_samples_at_the_temperature_the_user_will_read(sae: SAE, monkeypatch: pytest.MonkeyPatch) -> None:
    aligner = make(sae)
    seen: list[tuple[str, float, bool]] = []
    generate = aligner.generate

    def spy(prompts, topic=None, spec=None, **kw):  # noqa: ANN001, ANN003, ANN202
        if spec.max_new_tokens == FAST.max_new_tokens:  # the probes (not the contrast's own unsteered text)
            seen.append((spec.method, spec.temperature, spec.greedy))
        return generate(prompts, topic, spec, **kw)

    monkeypatch.setattr(aligner, "generate", spy)
    t = topic(sae, 3)
    aligner.auto_strength(t, Spec(strength="auto"))  # the default recipe samples at 1.2
    aligner.auto_strength(t, Spec(strength="auto", temperature=0.8))
    aligner.auto_strength(t, Spec(strength="auto", greedy=True))  # greedy text: the probes sample at 1
    assert seen == [("none", 1.0, False), ("add", 1.2, False), ("add", 0.8, False), ("add", 1.0, False)]
    # each temperature is its own choice (cached apart); the unsteered probe is measured once at 1
    assert len(t.extra["auto_strength"]) == 3
    pinned = make(sae, AutoStrengthConfig(**{**FAST.__dict__, "temperature": 1.0}))
    monkeypatch.setattr(pinned, "generate", spy)
    seen.clear()
    pinned.auto_strength(topic(sae, 3), Spec(strength="auto"))
    assert seen == [("none", 1.0, False), ("add", 1.0, False)]
    with pytest.raises(SaealignError, match="probe's temperature"):
        AutoStrengthConfig(temperature=0.0)
