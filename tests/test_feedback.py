"""Topic feedback (the additive push fades as the text reads like the topic): by hand, in the hook, in the Aligner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tiny_index, make_sae, make_texts
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.steering.aligner import Aligner
from saealign.steering.edits import Steering
from saealign.steering.feedback import SMOOTHING, TopicFeedback
from saealign.steering.hook import SteeringHook
from saealign.steering.spec import DEFAULT_STRENGTH, FEEDBACK_STRENGTH
from saealign.steering.spec import GenerationSpec as Spec

TEXTS = ["the cat sat on the old house", "a big dog runs near the river", "the dog ran"]


def setup(d_sae: int = 12, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    contrasts = [np.maximum(rng.normal(size=d_sae), 0), np.maximum(rng.normal(size=d_sae), 0)]
    return contrasts, rng.uniform(0, 0.5, size=d_sae)


def by_hand_r(acts: np.ndarray, contrast: np.ndarray, reference: np.ndarray) -> float:
    u = contrast / np.linalg.norm(contrast)
    return float((acts @ u - reference @ u) / np.linalg.norm(contrast))


def test_scale_by_hand_prompt_pass_and_kept_positions_do_not_count() -> None:
    contrasts, reference = setup()
    fb = TopicFeedback(contrasts, reference)
    rng = np.random.default_rng(1)
    prompt = torch.as_tensor(rng.uniform(0, 2, size=(2, 5, 12)), dtype=torch.float32)
    assert torch.equal(fb.scale(prompt, None), torch.ones(2, 1)) and torch.equal(fb.mean, torch.zeros(2))
    # the topic texts' own mean activation reads r = 1, the reference's r = 0
    on_topic = torch.as_tensor(np.stack([reference + c for c in contrasts]), dtype=torch.float32)[:, None]
    assert fb.topicality(on_topic)[:, 0].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    plain = torch.as_tensor(np.stack([reference, reference]), dtype=torch.float32)[:, None]
    assert fb.topicality(plain)[:, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-5)

    m = np.zeros(2)
    for step in range(4):
        acts = rng.uniform(0, 3, size=(2, 1, 12))
        keep = torch.tensor([[False], [step == 2]])  # row 1's third step is a special token: not counted
        got = fb.scale(torch.as_tensor(acts, dtype=torch.float32), keep)
        for row in range(2):
            r = min(max(by_hand_r(acts[row, 0], contrasts[row], reference), -1.0), 3.0)
            if not keep[row, 0]:
                m[row] = (1 - SMOOTHING) * m[row] + SMOOTHING * r
        assert fb.mean.tolist() == pytest.approx(m.tolist(), abs=1e-5)
        assert got[:, 0].tolist() == pytest.approx(np.clip(1 - m, 0, 1).tolist(), abs=1e-5)


def test_the_hook_scales_each_rows_push_by_its_feedback() -> None:
    sae = make_sae()
    contrasts, reference = setup(sae.d_sae)
    direction = torch.randn(2, sae.d_in)
    hook = SteeringHook(sae, Steering("add"), torch.full((2, sae.d_sae), 0.5), direction=direction,
                        feedback=TopicFeedback(contrasts, reference))
    prompt = torch.randn(2, 4, sae.d_in)
    assert torch.allclose(hook(None, (), prompt), prompt + direction[:, None], atol=1e-6)  # full push on the prompt
    step = torch.randn(2, 1, sae.d_in) * 3
    acts = sae.activate(sae.pre(step)).numpy()
    r = np.clip([by_hand_r(acts[i, 0], contrasts[i], reference) for i in range(2)], -1, 3)
    scale = torch.as_tensor(np.clip(1 - SMOOTHING * r, 0, 1), dtype=torch.float32)
    assert torch.allclose(hook(None, (), step), step + (direction * scale[:, None])[:, None], atol=1e-5)


def test_bad_feedback_is_one_clear_error() -> None:
    contrasts, reference = setup()
    with pytest.raises(SaealignError, match="no positive activation contrast"):
        TopicFeedback([np.zeros(12)], reference)
    with pytest.raises(SaealignError, match="score the topic with this SAE"):
        TopicFeedback(contrasts, reference[:5])
    with pytest.raises(SaealignError, match="2 rows"):
        TopicFeedback(contrasts, reference).scale(torch.zeros(3, 1, 12), None)
    with pytest.raises(SaealignError, match="needs a direction"):
        SteeringHook(make_sae(), Steering("swap"), torch.zeros(32), feedback=TopicFeedback(contrasts, reference))


def test_default_strength_follows_the_feedback() -> None:
    assert not Spec().feedback and Spec().strength == DEFAULT_STRENGTH["add"] == 0.05
    assert Spec(feedback=True).strength == FEEDBACK_STRENGTH["add"] == 0.35
    assert Spec("swap", feedback=True).strength == 1.0 and Spec("swap_add", feedback=True).strength == 0.3


def test_the_aligner_fades_only_after_the_prompt(tiny_lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> None:
    sae = make_sae()
    texts = make_texts(48, seed=3)
    index = build_tiny_index(tiny_lm, sae, tmp_path_factory.mktemp("index"), texts, ["x"] * len(texts), shard_size=8)
    aligner = Aligner(tiny_lm, sae, 0, index, HashingEmbedder())
    topic = aligner.topic(TEXTS)
    faded = aligner.generate(["the cat", "a dog runs"], topic,
                             Spec("add", strength=1.0, greedy=True, max_new_tokens=6, feedback=True))
    constant = aligner.generate(["the cat", "a dog runs"], topic,
                              Spec("add", strength=1.0, prompt_boost=1, greedy=True, max_new_tokens=6))
    # the first new token is predicted on the prompt pass, pushed in full either way
    assert [g.token_ids[0] for g in faded] == [g.token_ids[0] for g in constant]
    plan = aligner._plan(["the cat"], topic, Spec("add", strength=1.0, feedback=True), 0, None, None)
    assert plan.hook is not None and plan.hook.feedback is not None
    np.testing.assert_allclose(plan.hook.feedback.span.numpy(), [np.linalg.norm(topic.contrast)], rtol=1e-5)
