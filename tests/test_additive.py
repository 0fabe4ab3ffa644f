"""The additive methods (add, swap_add), topic directions, output scores, specials left unedited, unscored policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import saealign.steering.directions as directions
from conftest import EOS_ID, make_llama, make_sae, make_tokenizer
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.contrast import mean_activation
from saealign.reference.embed import HashingEmbedder
from saealign.reference.scoring import TopicScores
from saealign.residual_stream import layer_module
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering.aligner import Aligner
from saealign.steering.decoding import Sampling, decode_steps, row_generator
from saealign.steering.edits import Steering, apply_edit
from saealign.steering.hook import SteeringHook
from saealign.steering.spec import GenerationSpec as Spec
from saealign.steering.spec import parse_strength


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), name="tiny", key="tiny", load_seconds=0.0)


def scores_of(sae: SAE, seed: int = 0, scored: np.ndarray | None = None) -> TopicScores:
    s = np.random.default_rng(seed).random(sae.d_sae).astype(np.float32)
    mask = np.ones(sae.d_sae, bool) if scored is None else scored
    s[~mask] = 0
    return TopicScores(s, np.zeros(sae.d_sae), np.full(sae.d_sae, 30), mask, ["the dog sat"], sae_key=sae_key(sae))


def test_add_is_x_plus_the_direction_and_reads_the_pushed_residual(sae: SAE) -> None:
    x = torch.randn(2, 5, sae.d_in)
    v = torch.randn(sae.d_in)
    s = torch.rand(sae.d_sae)
    res = apply_edit(sae, x, Steering("add"), s, direction=v)
    assert torch.equal(res.out, x + v)
    assert torch.equal(res.acts_edited, sae.activate(sae.pre(x + v)))
    zero = apply_edit(sae, x, Steering("add"), s, direction=torch.zeros(sae.d_in))
    plain = apply_edit(sae, x, Steering("none"), s)
    assert torch.equal(zero.out, x) and torch.equal(zero.contamination, plain.contamination)
    # per-row directions
    rows = torch.randn(2, sae.d_in)
    assert torch.equal(apply_edit(sae, x, Steering("add"), s, direction=rows).out, x + rows[:, None, :])


def test_swap_add_is_swap_then_the_direction(sae: SAE) -> None:
    x = torch.randn(3, 4, sae.d_in)
    v = torch.randn(sae.d_in)
    s = torch.rand(sae.d_sae)
    swap = apply_edit(sae, x, Steering("swap"), s)
    both = apply_edit(sae, x, Steering("swap_add"), s, direction=v)
    assert torch.equal(both.out, swap.out + v)
    with pytest.raises(SaealignError, match="needs a topic direction"):
        apply_edit(sae, x, Steering("swap_add"), s)


def test_topic_direction_by_hand(sae: SAE) -> None:
    s = torch.zeros(sae.d_sae)
    s[[3, 7, 11]] = torch.tensor([1.0, 0.5, 0.25])
    out = torch.ones(sae.d_sae)
    out[7] = 0  # no output effect: left out
    unit = directions.unit_decoder(sae)
    want = 1.0 * unit[3] + 0.25 * unit[11]
    got = directions.topic_direction(sae, s, n_latents=8, output_scores=out)
    assert torch.allclose(got, want / want.norm(), atol=1e-6) and got.norm() == pytest.approx(1.0)
    only_top = directions.topic_direction(sae, s, n_latents=1, output_scores=out)
    assert torch.allclose(only_top, unit[3], atol=1e-6)
    with pytest.raises(SaealignError, match="nothing to steer along"):
        directions.topic_direction(sae, s, 4, output_scores=torch.zeros(sae.d_sae))


def test_output_scores_match_a_full_forward_and_the_residual_norm(lm: LoadedModel, sae: SAE) -> None:
    prompts = ["the cat sat on the", "a dog runs near the river"]
    own = ["the cat sat on the mat and slept", "a dog runs"]
    basis = directions.measure_basis(lm, sae, 0, prompts, own, scale=1.0, n_tokens=3, chunk=50, progress=False)
    np.testing.assert_allclose(basis.default_mean, mean_activation(lm, sae, 0, own), rtol=1e-6)
    assert basis.output_scores.shape == (sae.d_sae,) and basis.output_scores.max() == pytest.approx(1.0)
    assert basis.output_scores.min() >= 0
    tok, model = lm.tokenizer, lm.model
    norms = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, 1:]  # BOS excluded
        norms.append(hidden.norm(dim=-1))
    assert basis.residual_norm == pytest.approx(float(torch.cat(norms).median()), rel=1e-5)
    # the gain of one latent, recomputed with a full forward that adds the push at the last position only
    unit = directions.unit_decoder(sae)
    lens = unit * model.model.norm.weight.detach()
    gains = []
    for j in (0, 17):
        top = (lens[j] @ model.lm_head.weight.T).topk(3).indices
        gain = 0.0
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            base = torch.softmax(model(input_ids=ids).logits[0, -1], -1)

            def hook(_m, _i, out, j=j):  # noqa: ANN001, ANN202
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                h[:, -1] += unit[j] * basis.residual_norm
                return (h, *out[1:]) if isinstance(out, tuple) else h

            handle = layer_module(model, 0).register_forward_hook(hook)
            steered = torch.softmax(model(input_ids=ids).logits[0, -1], -1)
            handle.remove()
            gain += float(steered[top].sum() - base[top].sum()) / len(prompts)
        gains.append(max(gain, 0.0))
    raw = np.array(gains)
    got = basis.output_scores[[0, 17]]
    # scores are rank percentiles of the gains: the order of two latents' scores is the order of their gains
    assert (got > 0).tolist() == (raw > 1e-6).tolist()
    if abs(raw[0] - raw[1]) > 1e-4:
        assert (got[0] > got[1]) == (raw[0] > raw[1])


def test_rank_scores_by_hand() -> None:
    got = directions.rank_scores(np.array([0.5, -1.0, 0.0, 2.0, 0.5, 1.0]))
    assert got.tolist() == pytest.approx([0.5, 0.0, 0.0, 1.0, 0.5, 0.75])


def test_basis_is_cached_and_a_corrupt_file_is_measured_again(lm: LoadedModel, sae: SAE, tmp_path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = ["the cat sat on the"]
    calls: list[int] = []

    def own() -> list[str]:
        calls.append(1)
        return ["the dog ran home"]

    first = directions.load_or_measure_basis(lm, sae, 0, prompts, own, folder=tmp_path, progress=False)
    monkeypatch.setattr(directions, "measure_basis", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    again = directions.load_or_measure_basis(lm, sae, 0, prompts, own, folder=tmp_path, progress=False)
    assert np.array_equal(first.output_scores, again.output_scores) and first.residual_norm == again.residual_norm
    assert np.array_equal(first.default_mean, again.default_mean) and calls == [1]  # sampled only to measure
    (file,) = tmp_path.glob("basis-*.json")
    data = json.loads(file.read_text())
    for corrupt in ({"output_scores": data["output_scores"][:-1]}, {"default_mean": [-1.0] * sae.d_sae},
                    {"version": 2}):
        file.write_text(json.dumps({**data, **corrupt}))
        with pytest.raises(AssertionError, match="measured"):  # refused, so measured anew
            directions.load_or_measure_basis(lm, sae, 0, prompts, own, folder=tmp_path, progress=False)


def test_a_model_without_unembedding_says_so(sae: SAE) -> None:
    class Bare:
        def get_output_embeddings(self) -> None:
            return None

    with pytest.raises(SaealignError, match="no output embedding"):
        directions.unembedding(Bare())


def test_add_at_strength_zero_is_the_unsteered_text(lm: LoadedModel, sae: SAE, tmp_path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))
    aligner = Aligner(lm, sae, 0, embedder=HashingEmbedder())
    t = scores_of(sae)
    prompts = ["the cat sat on the", "a dog runs near"]
    plain = aligner.generate(prompts, None, Spec("none", greedy=True, max_new_tokens=6))
    zero = aligner.generate(prompts, t, Spec("add", strength=0, greedy=True, max_new_tokens=6))
    assert [g.token_ids for g in zero] == [g.token_ids for g in plain]
    strong = aligner.generate(prompts, t, Spec("add", strength=2, greedy=True, max_new_tokens=6))
    assert [g.token_ids for g in strong] != [g.token_ids for g in plain]
    assert all(g.strength == 2 and g.contamination is not None for g in strong)


def test_special_token_positions_are_left_unedited(lm: LoadedModel, sae: SAE) -> None:
    ids = [1, *lm.tokenizer("the cat", add_special_tokens=False)["input_ids"], EOS_ID, 20, 21]
    hook = SteeringHook(sae, Steering("add"), torch.rand(sae.d_sae), direction=torch.randn(sae.d_in) * 5)
    steps = decode_steps(lm.model, [ids], Sampling(2, greedy=True), [row_generator(0, "x")], 0, set(), hook,
                         layer_module(lm.model, 0), unedited_ids={EOS_ID})
    next(steps)
    changed = hook.n_changed[0][0]  # the prompt pass
    assert changed[0] == 0 and changed[ids.index(EOS_ID)] == 0  # first position and the special one
    assert bool((changed[1:3] > 0).all()) and bool((changed[-2:] > 0).all())


def test_unscored_latents_neutral_or_dropped(sae: SAE) -> None:
    mask = np.ones(sae.d_sae, bool)
    mask[:10] = False
    t = scores_of(sae, 3, mask)
    dropped, neutral = t.as_tensor(unscored="drop"), t.as_tensor(unscored="neutral")
    assert torch.equal(dropped[:10], torch.zeros(10))
    assert torch.all(neutral[:10] == float(np.median(t.scores[mask]))) and torch.equal(neutral[10:], dropped[10:])
    with pytest.raises(SaealignError, match="unscored policy"):
        t.as_tensor(unscored="veto")


def test_no_strength_means_the_methods_default() -> None:
    from saealign.steering.spec import DEFAULT_STRENGTH

    assert Spec().method == "add" and Spec().strength == DEFAULT_STRENGTH["add"] == 0.05
    assert Spec().boost == 4.0 and Spec().slot == 1.0  # the default recipe: prompt x4, the slot at 1
    assert Spec("swap").strength == 1.0 and Spec("weight", strength=None).strength == 1.0  # the paper's
    assert Spec("add", strength="auto").is_auto and Spec("clamp").strength == 1.0  # clamp ignores it
    assert Spec(**Spec("swap_add").to_json()) == Spec("swap_add")  # resolved once: JSON round-trips


def test_no_temperature_means_the_methods_default() -> None:
    from saealign.steering.spec import DEFAULT_TEMPERATURE

    # add and diffmean sample hotter as part of their recipe; every other method at the model's own 1
    assert Spec().temperature == Spec("diffmean").heat == DEFAULT_TEMPERATURE["add"] == 1.2
    assert Spec("none").temperature == Spec("swap").temperature == Spec("swap_add").temperature == 1.0
    assert Spec(temperature=0.7).temperature == 0.7 and Spec("none", temperature=2).temperature == 2.0
    assert Spec(**Spec().to_json()) == Spec()  # resolved once: JSON round-trips
    assert Sampling.of(Spec()).temperature == 1.2
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(SaealignError, match="temperature"):
            Spec(temperature=bad)  # type: ignore[arg-type]
    assert Spec(temperature=0.0, greedy=True).greedy  # greedy reads no temperature


def test_the_unsteered_side_samples_at_the_unsteered_default_unless_one_was_chosen() -> None:
    plain = Spec(max_new_tokens=9).unsteered()
    assert (plain.method, plain.temperature, plain.max_new_tokens, plain.tune_steps) == ("none", 1.0, 9, 0)
    assert Spec(temperature=0.7).unsteered().temperature == 0.7  # chosen: both sides sample at it
    assert Spec("swap", temperature=1.3).unsteered().temperature == 1.3
    assert Spec(tune_steps=3).unsteered().tune_steps == 0


def test_strengths_outside_the_methods_range_are_refused() -> None:
    assert parse_strength("auto", "add") == "auto" and parse_strength("0.3", "add") == 0.3
    for bad, method in ((3, "add"), (9, "swap"), ("inf", "swap"), ("nan", "add"), (-1, "weight"), (True, "swap")):
        with pytest.raises(SaealignError, match="strength"):
            parse_strength(bad, method)
    with pytest.raises(SaealignError, match="between 0 and 2"):
        Spec("add", strength=2.5)


def test_squared_distances_weigh_eq1_as_the_authors_code() -> None:
    import scipy.sparse as sp

    from saealign.reference.scoring import score_topic

    rng = np.random.default_rng(0)
    summary = sp.csr_matrix(rng.random((40, 6)) * (rng.random((40, 6)) > 0.3))
    d = rng.random(40) + 0.5
    squared = score_topic(summary, d, min_prompts=1, distance_power=2)
    by_hand = score_topic(summary, d * d, min_prompts=1)
    assert np.array_equal(squared.scores, by_hand.scores) and squared.extra == {"distance_power": 2}
    assert score_topic(summary, d, min_prompts=1).extra == {}
    with pytest.raises(SaealignError, match="distance_power"):
        score_topic(summary, d, min_prompts=1, distance_power=3)
