"""M2 edits and the steering hook: identities and hand-set examples on a tiny random Llama."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.steering.edits import Steering, apply_edit, contamination, edit_clamp, edit_swap, edit_weight
from saealign.steering.hook import SteeringHook, _with_hidden, steer

D_MODEL, D_SAE, LAYER = 64, 256, 0


@pytest.fixture(scope="module")
def model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # a random model could stop early; the tests count generated positions
    )
    # Larger embeddings than the 0.02 default, so the residual stream activates many latents.
    cfg.initializer_range = 0.1
    m = LlamaForCausalLM(cfg).eval()
    m.requires_grad_(False)
    return m


def make_sae(activation: str = "topk", normalize_input: str = "none", seed: int = 1) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(
        d_in=D_MODEL,
        d_sae=D_SAE,
        activation=activation,  # type: ignore[arg-type]
        k=8 if activation == "topk" else None,
        normalize_input=normalize_input,  # type: ignore[arg-type]
    )
    return SAE(
        cfg,
        W_enc=torch.randn(D_MODEL, D_SAE, generator=g),
        b_enc=torch.randn(D_SAE, generator=g) * 0.1,
        W_dec=torch.randn(D_SAE, D_MODEL, generator=g) * 0.1,
        b_dec=torch.randn(D_MODEL, generator=g) * 0.1,
        threshold=torch.full((D_SAE,), 0.5) if activation == "jumprelu" else None,
    ).requires_grad_(False)


def hand_sae(activation: str, d: int, k: int | None = None) -> SAE:
    """Identity encoder/decoder of width d: γ = x, so activations are set by hand."""
    cfg = SAEConfig(d_in=d, d_sae=d, activation=activation, k=k, apply_b_dec_to_input=False)  # type: ignore[arg-type]
    return SAE(cfg, W_enc=torch.eye(d), W_dec=torch.eye(d)).requires_grad_(False)


def ids(batch: int = 2, seq: int = 7) -> Tensor:
    return torch.randint(2, 128, (batch, seq), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def residual(model: nn.Module, input_ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, output_hidden_states=True).hidden_states[LAYER + 1]


def rand_scores(seed: int, *shape: int) -> Tensor:
    return torch.rand(*shape, D_SAE, generator=torch.Generator().manual_seed(seed))


ALL_SAES = [("topk", "none"), ("relu", "none"), ("jumprelu", "none"), ("topk", "layer_norm")]


# -- Steering --------------------------------------------------------------------------------
def test_steering_validation_lists_choices() -> None:
    with pytest.raises(SaealignError, match="none, sae, clamp, swap, weight"):
        Steering(method="steer")
    with pytest.raises(SaealignError, match="error, replace"):
        Steering(mode="add")
    with pytest.raises(SaealignError, match="clamp_n"):
        Steering(method="clamp", clamp_n=0)
    with pytest.raises(SaealignError, match="strength"):
        Steering(strength=-1.0)


def test_strength_is_a_power_of_the_scores() -> None:
    s = rand_scores(0)
    assert Steering(strength=1.0).weights(s) is s
    assert torch.equal(Steering(strength=2.0).weights(s), s * s)
    sae, gamma = make_sae(), torch.randn(5, D_SAE)
    assert torch.equal(edit_swap(sae, gamma, Steering(strength=2.0).weights(s)), edit_swap(sae, gamma, s * s))


# -- identities on the model -------------------------------------------------------------------
@pytest.mark.parametrize(("activation", "norm"), ALL_SAES)
def test_error_mode_sae_leaves_logits_unchanged(model: nn.Module, activation: str, norm: str) -> None:
    sae, x = make_sae(activation, norm), ids()
    before = logits(model, x)
    with steer(model, model.model.layers[LAYER], sae, Steering("sae", "error"), rand_scores(0)) as hook:
        during = logits(model, x)
    assert torch.equal(during, before)
    assert hook.n_active_per_token().float().mean() > 1  # the SAE did fire: the identity is not vacuous


@pytest.mark.parametrize(("activation", "norm"), ALL_SAES)
def test_replace_mode_sae_equals_sae_forward(model: nn.Module, activation: str, norm: str) -> None:
    sae = make_sae(activation, norm)
    x = residual(model, ids())
    res = apply_edit(sae, x, Steering("sae", "replace"), rand_scores(0))
    assert torch.equal(res.out, sae(x))
    assert torch.equal(res.n_changed, torch.zeros(x.shape[:-1], dtype=torch.long))


@pytest.mark.parametrize(
    ("x_dtype", "sae_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_dtypes_out_follows_x_and_error_mode_never_rounds_x(
    x_dtype: torch.dtype, sae_dtype: torch.dtype
) -> None:
    sae = make_sae("topk").to(sae_dtype)
    x = torch.randn(2, 3, D_MODEL, generator=torch.Generator().manual_seed(6)).to(x_dtype)
    res = apply_edit(sae, x, Steering("sae", "error"), rand_scores(0))
    assert res.out.dtype == x_dtype and res.acts_edited.dtype == sae_dtype
    assert torch.equal(res.out, x)
    swapped = apply_edit(sae, x, Steering("swap", "replace"), rand_scores(0))
    assert swapped.out.dtype == x_dtype and swapped.contamination.dtype == torch.float32


@pytest.mark.parametrize(
    ("activation", "value"), [("topk", 1.0), ("topk", 0.5), ("relu", 1.0), ("relu", 0.5), ("jumprelu", 1.0)]
)
def test_swap_with_equal_scores_equals_sae(model: nn.Module, activation: str, value: float) -> None:
    sae, x = make_sae(activation), ids()
    scores = torch.full((D_SAE,), value)
    with steer(model, model.model.layers[LAYER], sae, Steering("sae", "replace"), scores):
        plain = logits(model, x)
    with steer(model, model.model.layers[LAYER], sae, Steering("swap", "replace"), scores) as hook:
        swapped = logits(model, x)
    assert torch.equal(swapped, plain)
    assert int(hook.n_changed_per_token().sum()) == 0
    assert not torch.equal(plain, logits(model, x))  # replace mode does change the model


def test_clamp_to_current_value_is_a_noop(model: nn.Module) -> None:
    n, forced, multiplier = 5, 2.0**16, 4.0  # powers of two: forced / multiplier * multiplier is exact
    sae = make_sae("topk")
    # Latents 0..n-1 ignore the input (zero encoder column) and sit far above the rest: always in the
    # top k, with the same value in every token.
    sae.W_enc[:, :n] = 0
    sae.b_enc[:n] = forced
    scores = torch.zeros(D_SAE)
    scores[:n] = 1.0
    max_act = torch.full((D_SAE,), 7.0)
    max_act[:n] = forced / multiplier
    clamp = Steering("clamp", "replace", clamp_n=n, clamp_multiplier=multiplier)

    x = residual(model, ids())
    res = apply_edit(sae, x, clamp, scores, max_act)
    assert torch.equal(res.acts_edited, sae.encode(x))
    assert torch.equal(res.out, sae(x))
    assert int(res.n_changed.sum()) == 0
    before = logits(model, ids())
    with steer(model, model.model.layers[LAYER], sae, replace(clamp, mode="error"), scores, max_act):
        assert torch.equal(logits(model, ids()), before)


def test_clamp_sets_the_top_scored_latents() -> None:
    sae = hand_sae("relu", 4)
    gamma = torch.tensor([[1.0, -2.0, 3.0, 0.0]])
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8])
    got = edit_clamp(sae, gamma, scores, torch.tensor([1.0, 2.0, 3.0, 4.0]), n=2, multiplier=10.0)
    assert torch.equal(got, torch.tensor([[1.0, 20.0, 3.0, 40.0]]))


# -- hand-set examples ------------------------------------------------------------------------
def test_swap_on_topk_flips_the_winner_and_keeps_the_original_value() -> None:
    sae = hand_sae("topk", 4, k=1)
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    scores = torch.tensor([0.25, 0.75, 1.0, 1.0])  # weighted: [0.75, 1.5, 0, 0] -> latent 1 wins
    plain = apply_edit(sae, x, Steering("sae", "replace"), scores)
    swap = apply_edit(sae, x, Steering("swap", "replace"), scores)
    weight = apply_edit(sae, x, Steering("weight", "replace"), scores)
    assert torch.equal(plain.acts_edited, torch.tensor([[3.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(swap.acts_edited, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))  # original γ_1, not 1.5
    assert torch.equal(weight.acts_edited, torch.tensor([[0.0, 1.5, 0.0, 0.0]]))
    assert torch.equal(swap.out, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))
    assert swap.n_changed.tolist() == [2]
    assert swap.contamination.tolist() == [0.25]  # 2 * (1 - 0.75) / 2
    assert plain.contamination.tolist() == [0.75]
    # error mode keeps what the SAE misses: x + dec(a') - dec(a)
    assert torch.equal(
        apply_edit(sae, x, Steering("swap", "error"), scores).out, torch.tensor([[0.0, 4.0, 0, 0]])
    )


def test_swap_on_jumprelu_drops_latents_under_the_threshold() -> None:
    sae = hand_sae("jumprelu", 3)
    sae.threshold[:] = 1.0
    gamma = torch.tensor([2.0, 4.0, 0.5])
    got = edit_swap(sae, gamma, torch.tensor([0.25, 0.5, 1.0]))  # weighted: 0.5, 2.0, 0.5
    assert torch.equal(got, torch.tensor([0.0, 4.0, 0.0]))


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_weight_is_sigma_of_weighted_gamma_with_the_swap_support(activation: str) -> None:
    sae = make_sae(activation)
    gamma = torch.randn(6, 5, D_SAE, generator=torch.Generator().manual_seed(4)) * 2
    w = rand_scores(5)
    weight, swap = edit_weight(sae, gamma, w), edit_swap(sae, gamma, w)
    assert torch.equal(weight, sae.activate(gamma * w))
    assert torch.equal(weight != 0, swap != 0)
    assert not torch.equal(weight, swap)
    assert (swap != 0).any()


# -- contamination -----------------------------------------------------------------------------
def test_contamination_extremes(model: nn.Module) -> None:
    sae, x = make_sae("topk"), residual(model, ids())
    ones = apply_edit(sae, x, Steering("swap"), torch.ones(D_SAE))
    assert torch.equal(ones.contamination, torch.zeros(x.shape[:-1]))
    assert (ones.n_active > 0).all()
    zeros = apply_edit(sae, x, Steering("sae"), torch.zeros(D_SAE))
    assert torch.equal(zeros.contamination, torch.ones(x.shape[:-1]))
    # Swap with all-zero scores selects nothing: no active latent, contamination defined as 0.
    empty = apply_edit(sae, x, Steering("swap"), torch.zeros(D_SAE))
    assert torch.equal(empty.n_active, torch.zeros(x.shape[:-1], dtype=torch.long))
    assert torch.equal(empty.contamination, torch.zeros(x.shape[:-1]))


def test_contamination_hand_computed() -> None:
    acts = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    got = contamination(acts, torch.tensor([1.0, 0.5, 0.0]))  # (0 + 1 + 3) / 6
    assert got[0].item() == pytest.approx(2 / 3, rel=1e-6)
    assert got[1].item() == 0.0


# -- per-row scores ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["clamp", "swap", "weight"])
def test_per_row_scores_equal_running_each_row_alone(model: nn.Module, method: str) -> None:
    sae = make_sae("topk")
    x = residual(model, ids(batch=2, seq=6))
    scores = torch.stack([rand_scores(10), rand_scores(11)])
    max_act = torch.rand(D_SAE, generator=torch.Generator().manual_seed(12)) + 1
    steering = Steering(method, "replace", clamp_n=3)
    both = apply_edit(sae, x, steering, scores, max_act)
    for row in range(2):
        alone = apply_edit(sae, x[row], steering, scores[row], max_act)
        assert torch.equal(both.n_changed[row], alone.n_changed)
        assert torch.equal(both.acts_edited[row] != 0, alone.acts_edited != 0)
        torch.testing.assert_close(both.acts_edited[row], alone.acts_edited)
        torch.testing.assert_close(both.out[row], alone.out)
        torch.testing.assert_close(both.contamination[row], alone.contamination)
    assert not torch.equal(both.acts_edited[0] != 0, both.acts_edited[1] != 0) or method == "clamp"
    # and on exactly the same γ the per-row edit is bit-identical to the single-row one
    gamma = sae.pre(x)
    for row in range(2):
        assert torch.equal(edit_swap(sae, gamma, scores)[row], edit_swap(sae, gamma[row], scores[row]))
        assert torch.equal(
            edit_clamp(sae, gamma, scores, max_act, 3, 10.0)[row],
            edit_clamp(sae, gamma[row], scores[row], max_act, 3, 10.0),
        )


def test_score_shape_errors() -> None:
    sae = make_sae("topk")
    with pytest.raises(SaealignError, match="latents"):
        apply_edit(sae, torch.randn(2, 3, D_MODEL), Steering("swap"), torch.rand(D_SAE - 1))
    with pytest.raises(SaealignError, match=r"\[batch, d_sae\]"):
        apply_edit(sae, torch.randn(2, 3, D_MODEL), Steering("swap"), torch.rand(3, D_SAE))
    with pytest.raises(SaealignError, match=r"\[0, 1\]"):
        SteeringHook(sae, Steering("swap"), torch.rand(D_SAE) + 1)
    with pytest.raises(SaealignError, match="max_act"):
        SteeringHook(sae, Steering("clamp"), torch.rand(D_SAE))


# -- the hook ----------------------------------------------------------------------------------
def test_hook_is_removed_and_modules_untouched(model: nn.Module) -> None:
    sae, x = make_sae("topk"), ids()
    before = logits(model, x)
    modules = list(model.modules())
    layer = model.model.layers[LAYER]
    hooks = dict(layer._forward_hooks)  # HF 5 keeps its own output-capturing hook on each block
    with steer(model, layer, sae, Steering("swap", "replace"), rand_scores(0)):
        assert not torch.equal(logits(model, x), before)
    assert torch.equal(logits(model, x), before)
    with (
        pytest.raises(RuntimeError, match="boom"),
        steer(model, layer, sae, Steering("swap", "replace"), rand_scores(0)),
    ):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, x), before)
    assert layer._forward_hooks == hooks
    assert all(a is b for a, b in zip(list(model.modules()), modules, strict=True))
    with (
        pytest.raises(SaealignError, match="not a module of this model"),
        steer(model, nn.Linear(2, 2), sae, Steering(), rand_scores(0)),
    ):
        pass


def test_hidden_states_output_sees_the_steered_block(model: nn.Module) -> None:
    sae, x = make_sae("topk"), ids()
    plain = residual(model, x)  # also makes HF install its capture hook before ours
    steering = Steering("swap", "replace")
    with steer(model, model.model.layers[LAYER], sae, steering, rand_scores(0)):
        steered = residual(model, x)
    assert torch.equal(steered, apply_edit(sae, plain, steering, rand_scores(0)).out)


def test_kept_positions_pass_through_unedited(model: nn.Module) -> None:
    sae, x = make_sae("topk"), ids(batch=2, seq=6)
    plain = residual(model, x)
    steering = Steering("swap", "replace")
    full = apply_edit(sae, plain, steering, rand_scores(0))
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, 0] = True  # the first position, as generation keeps it
    keep[1, :3] = True  # and left padding
    with steer(model, model.model.layers[LAYER], sae, steering, rand_scores(0)) as hook:
        hook.keep = keep
        steered = residual(model, x)
        hook.keep = None
        again = residual(model, x)
    assert torch.equal(steered[keep], plain[keep])
    assert torch.equal(steered[~keep], full.out[~keep])
    assert not torch.equal(full.out[keep], plain[keep])  # the kept positions would have changed
    assert torch.equal(again, full.out)  # cleared: every position is edited again
    contam, changed = hook.contamination[0], hook.n_changed[0]
    assert torch.equal(contam, full.contamination.masked_fill(keep, 0))
    assert torch.equal(changed, full.n_changed.masked_fill(keep, 0))
    assert torch.equal(hook.n_active[0], full.n_active.masked_fill(keep, 0))
    assert (full.contamination[keep] > 0).all()
    with steer(model, model.model.layers[LAYER], sae, steering, rand_scores(0)) as hook:
        hook.keep = keep[:, :4]
        with pytest.raises(SaealignError, match="keep has shape"):
            residual(model, x)


def test_method_none_measures_without_editing(model: nn.Module) -> None:
    sae, x = make_sae("topk"), ids()
    before = logits(model, x)
    with steer(model, model.model.layers[LAYER], sae, Steering("none"), rand_scores(0)) as hook:
        assert torch.equal(logits(model, x), before)
    res = apply_edit(sae, residual(model, x), Steering("none"), rand_scores(0))
    assert torch.equal(hook.contamination_per_token(), res.contamination)
    assert (res.contamination > 0).all()


def test_generate_records_prompt_and_new_positions(model: nn.Module) -> None:
    sae, prompt = make_sae("topk"), ids(batch=2, seq=5)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(prompt, **kwargs)
    with steer(model, model.model.layers[LAYER], sae, Steering("sae", "error"), rand_scores(0)) as hook:
        same = model.generate(prompt, **kwargs)
    assert torch.equal(same, plain)
    assert [tuple(c.shape) for c in hook.contamination] == [(2, 5), (2, 1), (2, 1)]
    assert hook.contamination_per_token().shape == (2, 5 + 3 - 1)  # the last new token is never fed back

    scores = torch.stack([rand_scores(20), rand_scores(21)])
    with steer(model, model.model.layers[LAYER], sae, Steering("swap", "replace"), scores) as hook:
        steered = model.generate(prompt, **kwargs)
    assert steered.shape == plain.shape
    assert hook.n_changed_per_token().shape == (2, 7)
    assert (hook.n_changed_per_token() > 0).any()


class _TupleBlock(nn.Module):
    """A block in the older HF style: returns ``(hidden, extra)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: Tensor) -> tuple[Tensor, str]:
        return self.lin(x), "cache"


def test_tuple_outputs_keep_their_structure() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(_TupleBlock())
    sae, x = make_sae("relu"), torch.randn(2, 3, D_MODEL)
    with torch.no_grad():
        hidden, extra = block(x)
        with steer(block, block[0], sae, Steering("swap", "replace"), rand_scores(0)):
            new_hidden, new_extra = block(x)
    assert new_extra == "cache"
    assert torch.equal(new_hidden, apply_edit(sae, hidden, Steering("swap", "replace"), rand_scores(0)).out)
    with pytest.raises(SaealignError, match="Tensor or a tuple"):
        _with_hidden({"h": hidden}, hidden)
