"""The concept slot: the steered prompt is read after a fixed template whose placeholder takes a hard push."""

from __future__ import annotations

import pytest
import torch

from conftest import make_sae, push_aligner, push_topic
from saealign.errors import SaealignError
from saealign.evaluate.steer_bench import BenchCondition, default_conditions, shared_by_topics, unsteered
from saealign.sae.autoencoder import SAE
from saealign.steering.aligner import Aligner
from saealign.steering.decoding import slot_positions
from saealign.steering.hook import SteeringHook
from saealign.steering.slot import SLOT_TEMPLATE, slot_ids, slot_position, slotted
from saealign.steering.spec import DEFAULT_SLOT_PUSH
from saealign.steering.spec import GenerationSpec as Spec

PROMPTS = ["the cat sat on the", "a dog runs near"]


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture()
def aligner(sae: SAE, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Aligner:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))  # the tiny model's steering basis stays out of the user's cache
    return push_aligner(sae)


def n_tokens(aligner: Aligner, text: str) -> int:
    return len(aligner.lm.tokenizer(text)["input_ids"])  # type: ignore[operator]


def test_the_slot_is_the_last_token_of_the_first_placeholder() -> None:
    assert slot_position([1, 7, 8, 5, 7, 8], [7, 8]) == 2
    assert slot_position([4, 9], [9]) == 1
    with pytest.raises(SaealignError, match="splits the slot word"):
        slot_position([1, 2, 3], [7])


def test_slot_positions_follow_the_left_padding() -> None:
    mask = slot_positions([[1, 2, 3], [4, 5]], [1, 0], 3)
    assert mask.tolist() == [[False, True, False], [False, True, False]]  # row 2 sits one column to the right
    assert not slot_positions([[1, 2], [3]], [None, None], 2).any()
    with pytest.raises(SaealignError, match="lies outside its 2 prompt tokens"):
        slot_positions([[1, 2]], [2], 2)
    with pytest.raises(SaealignError, match="1 slot positions for 2 rows"):
        slot_positions([[1], [2]], [0], 1)


def test_the_placeholder_alone_takes_the_slot_push(aligner: Aligner, sae: SAE, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    real = SteeringHook._slotted

    def spy(self: SteeringHook, out: torch.Tensor) -> torch.Tensor:
        result = real(self, out)
        calls.append((out.clone(), result.clone(), None if self.slot_mask is None else self.slot_mask.clone(),
                      self.direction))
        return result

    monkeypatch.setattr(SteeringHook, "_slotted", spy)
    gens = aligner.generate(PROMPTS, push_topic(sae), Spec("add", strength=0.5, slot_push=2.0, greedy=True, max_new_tokens=3))
    assert len(calls) == 3  # the prompt pass, then one call per fed-back token
    before, after, mask, direction = calls[0]
    assert mask is not None and direction is not None and mask.sum(dim=1).tolist() == [1, 1]
    # exactly the row's push x slot_push / strength at its placeholder, nothing anywhere else
    want = mask.unsqueeze(-1).float() * (direction * (2.0 / 0.5)).unsqueeze(1)
    assert torch.allclose(after - before, want, atol=1e-6, rtol=0)
    assert all(m is None and torch.equal(b, a) for b, a, m, _ in calls[1:])
    word = slot_ids(aligner.lm.tokenizer)
    for p, g in zip(PROMPTS, gens, strict=True):
        assert g.prompt_tokens == n_tokens(aligner, slotted(p))  # the template is fed...
        assert g.prompt == p  # ...and never shown
    ids = aligner.lm.tokenizer(slotted(PROMPTS[1]))["input_ids"]  # type: ignore[operator]
    width = mask.shape[1]
    assert ids[int(mask[1].nonzero()) - (width - len(ids))] == word[-1]


def test_without_its_push_the_slot_is_the_template_before_the_prompt(aligner: Aligner, sae: SAE,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    t = push_topic(sae)
    spec = Spec("add", strength=0.4, slot_push=1.5, max_new_tokens=6)
    slot = aligner.generate(PROMPTS, t, spec, seed=[3, 4])
    monkeypatch.setattr(SteeringHook, "_slotted", lambda self, out: out)
    unpushed = aligner.generate(PROMPTS, t, spec, seed=[3, 4])
    by_hand = aligner.generate([SLOT_TEMPLATE + p for p in PROMPTS], t, Spec("add", strength=0.4, slot_push=0,
                                                                              max_new_tokens=6), seed=[3, 4])
    assert [g.token_ids for g in unpushed] == [g.token_ids for g in by_hand]  # same text fed, same push, same draws
    assert [g.token_ids for g in slot] != [g.token_ids for g in unpushed]  # the placeholder's push moves the text


def test_a_row_at_strength_0_gets_no_slot(aligner: Aligner, sae: SAE) -> None:
    t = push_topic(sae)
    gens = aligner.generate(PROMPTS, t, Spec("add", slot_push=1.0, max_new_tokens=2), strength_per_row=[0.0, 0.3])
    assert gens[0].prompt_tokens == n_tokens(aligner, PROMPTS[0])
    assert gens[1].prompt_tokens == n_tokens(aligner, slotted(PROMPTS[1]))
    plain = aligner.generate(PROMPTS, t, Spec("add", slot_push=0, max_new_tokens=2), strength_per_row=[0.0, 0.3])
    assert [g.prompt_tokens for g in plain] == [n_tokens(aligner, p) for p in PROMPTS]


def test_slot_push_is_resolved_and_checked() -> None:
    assert Spec().slot == Spec("add").slot_push == DEFAULT_SLOT_PUSH["add"] == Spec("diffmean").slot == 1.0
    assert Spec("swap").slot == Spec("swap_add").slot == 0.0  # only add and diffmean have a default slot
    assert Spec(**Spec().to_json()) == Spec()
    for bad in (-0.1, 4.5, float("nan"), float("inf"), True, "1"):
        with pytest.raises(SaealignError, match="slot_push must be a number from 0 to 4"):
            Spec(slot_push=bad)  # type: ignore[arg-type]


def test_the_benchmark_measures_the_slot_against_its_template_and_the_push_without_it() -> None:
    conds = {c.label: c for c in default_conditions(Spec(strength=0.15, prompt_boost=1, slot_push=1.0, temperature=1))}
    alone = conds["slot template alone"]
    assert alone.slot_template and shared_by_topics(alone) and not unsteered(alone)
    assert unsteered(conds["none"]) and not conds["none"].slot_template
    assert conds["add 0.15"].spec.slot == 0.0 and conds["default (add 0.15 slot 1)"].spec.slot == 1.0
    assert "slot template alone" not in {c.label for c in default_conditions(Spec(slot_push=0))}

    class Topic:
        title, align = "cooking", ["a soup"]

    assert alone.prefix(Topic()) == SLOT_TEMPLATE  # type: ignore[arg-type]
    both = BenchCondition("x", Spec(), prompting=True, slot_template=True)
    assert both.prefix(Topic()).startswith(SLOT_TEMPLATE) and "cooking" in both.prefix(Topic())  # type: ignore[arg-type]
