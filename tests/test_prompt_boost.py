"""prompt_boost: the additive push on the prompt pass, a multiple of the push on each generated token."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import saealign.steering.hook as hook_mod
from conftest import make_sae, push_aligner, push_topic
from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE
from saealign.steering.aligner import Aligner
from saealign.steering.spec import GenerationSpec as Spec

PROMPTS = ["the cat sat on the", "a dog runs near"]


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture()
def aligner(sae: SAE, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Aligner:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))  # the tiny model's steering basis stays out of the user's cache
    return push_aligner(sae)


def test_the_prompt_pass_is_pushed_boost_times_harder(aligner: Aligner, sae: SAE,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pushes: list[torch.Tensor] = []
    real = hook_mod.apply_edit

    def spy(*args: Any, **kwargs: Any) -> Any:
        pushes.append(args[-1].clone())  # the direction actually added in this forward call
        return real(*args, **kwargs)

    monkeypatch.setattr(hook_mod, "apply_edit", spy)
    t = push_topic(sae)
    aligner.generate(PROMPTS, t, Spec("add", strength=0.5, prompt_boost=3.0, greedy=True, max_new_tokens=4))
    boosted = list(pushes)
    pushes.clear()
    aligner.generate(PROMPTS, t, Spec("add", strength=0.5, prompt_boost=1, greedy=True, max_new_tokens=4))
    plain = list(pushes)
    assert len(boosted) == len(plain) == 4  # the prompt pass, then one call per fed-back token
    assert torch.allclose(boosted[0], plain[0] * 3.0, rtol=1e-6, atol=0)
    assert all(torch.equal(b, p) for b, p in zip(boosted[1:], plain[1:], strict=True))


def test_the_first_token_is_the_one_of_the_boosted_strength(aligner: Aligner, sae: SAE) -> None:
    # the prompt pass alone predicts the first new token: boost b at strength s reads as strength s x b there
    t = push_topic(sae)
    boosted = aligner.generate(PROMPTS, t, Spec("add", strength=0.4, prompt_boost=2.5, max_new_tokens=1), seed=[3, 4])
    scaled = aligner.generate(PROMPTS, t, Spec("add", strength=1.0, prompt_boost=1, max_new_tokens=1), seed=[3, 4])
    plain = aligner.generate(PROMPTS, t, Spec("add", strength=0.4, prompt_boost=1, max_new_tokens=6, greedy=True))
    two = aligner.generate(PROMPTS, t, Spec("add", strength=0.4, prompt_boost=5.0, max_new_tokens=6, greedy=True))
    assert [g.token_ids for g in boosted] == [g.token_ids for g in scaled]
    assert [g.token_ids for g in two] != [g.token_ids for g in plain]
    one = aligner.generate(PROMPTS, t, Spec("add", strength=0.4, prompt_boost=1.0, max_new_tokens=6, greedy=True))
    assert [g.token_ids for g in one] == [g.token_ids for g in plain]


def test_bad_prompt_boost_is_one_clear_error() -> None:
    for bad in (-0.5, 11, float("nan"), float("inf"), True, "2"):
        with pytest.raises(SaealignError, match="prompt_boost must be a number from 0 to 10"):
            Spec(prompt_boost=bad)  # type: ignore[arg-type]
    with pytest.raises(SaealignError, match=r"strength 1.5 x prompt_boost 2 pushes the prompt past add's largest"):
        Spec("add", strength=1.5, prompt_boost=2)
    assert Spec("add", strength="auto", prompt_boost=4).prompt_boost == 4  # the search's candidates are small
    assert Spec("swap", strength=5, prompt_boost=4).strength == 5  # Swap has no push: the boost is unused


def test_no_boost_means_the_methods_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import saealign.steering.spec as spec_mod
    from saealign.steering.spec import DEFAULT_PROMPT_BOOST

    assert Spec().prompt_boost == Spec("add").boost == DEFAULT_PROMPT_BOOST["add"]
    assert Spec(feedback=True).prompt_boost == 1.0  # its strength was chosen with a constant push
    assert Spec("swap_add").prompt_boost == Spec("swap").prompt_boost == 1.0
    assert Spec(prompt_boost=0).prompt_boost == 0 and Spec(feedback=True, prompt_boost=2).prompt_boost == 2
    assert Spec(**Spec().to_json()) == Spec()  # resolved once: JSON round-trips
    # a default boost gives way where it would push the prompt past the method's range; an explicit one errs
    monkeypatch.setitem(spec_mod.DEFAULT_PROMPT_BOOST, "add", 3.0)
    assert Spec("add", strength=0.5).prompt_boost == 3.0 and Spec("add", strength=0).prompt_boost == 3.0
    assert Spec("add", strength=1.0).prompt_boost == 2.0 and Spec("add", strength=2.0).prompt_boost == 1.0
