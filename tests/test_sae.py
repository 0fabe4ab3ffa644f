"""SAE class identities: activations, hand-set weights with obvious answers, persistence, config checks."""

from __future__ import annotations

import pytest
import torch

from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.sae.saelens import load_saelens_folder


def random_sae(activation: str = "topk", k: int | None = 3, d_in: int = 8, d_sae: int = 16, **cfg) -> SAE:
    g = torch.Generator().manual_seed(0)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }
    if activation == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g)
    cfg_ = SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, **cfg)  # type: ignore[arg-type]
    return SAE(cfg_, **w)


def eye_sae(activation: str, k: int | None = None, b_dec=(0.0, 0.0), threshold=None, **cfg) -> SAE:
    """2 -> 2 SAE with identity encoder and decoder: γ = x - b_dec (if applied), x̂ = a + b_dec."""
    cfg_ = SAEConfig(d_in=2, d_sae=2, activation=activation, k=k, **cfg)  # type: ignore[arg-type]
    thr = torch.tensor(threshold) if threshold is not None else None
    return SAE(cfg_, torch.eye(2), torch.zeros(2), torch.eye(2), torch.tensor(b_dec), thr)


X = torch.randn(5, 7, 8, generator=torch.Generator().manual_seed(1)) * 3


# -- activations -------------------------------------------------------------------------------------
def test_topk_keeps_exactly_k_largest():
    sae = random_sae("topk", k=3)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: exactly k survive
    pre = sae.pre(X)
    a = sae.activate(pre)
    assert ((a != 0).sum(-1) == 3).all()
    kth = pre.topk(3, dim=-1).values[..., -1:]
    assert torch.equal(a != 0, pre >= kth)
    assert torch.equal(a[a != 0], pre[a != 0])


def test_topk_drops_negative_winners():
    sae = eye_sae("topk", k=2)
    x = torch.tensor([[3.0, -1.0], [-2.0, -5.0]])
    assert torch.equal(sae.encode(x), torch.tensor([[3.0, 0.0], [0.0, 0.0]]))


def test_jumprelu_threshold_is_strict():
    sae = eye_sae("jumprelu", threshold=[1.0, 0.5], apply_b_dec_to_input=False)
    x = torch.tensor([[1.0, 0.6], [1.5, 0.5], [0.9, -2.0]])
    expected = torch.tensor([[0.0, 0.6], [1.5, 0.0], [0.0, 0.0]])
    assert torch.equal(sae.encode(x), expected)


def test_relu_and_b_dec_subtraction_by_hand():
    # γ = x - b_dec = [2, -3] -> a = [2, 0] -> x̂ = a + b_dec = [3, 1]
    sae = eye_sae("relu", b_dec=(1.0, 1.0))
    x = torch.tensor([3.0, -2.0])
    assert torch.equal(sae.pre(x), torch.tensor([2.0, -3.0]))
    assert torch.equal(sae.encode(x), torch.tensor([2.0, 0.0]))
    assert torch.equal(sae(x), torch.tensor([3.0, 1.0]))
    # without the subtraction γ = x: a = [3, 0], x̂ = [4, 1]
    no_sub = eye_sae("relu", b_dec=(1.0, 1.0), apply_b_dec_to_input=False)
    assert torch.equal(no_sub(x), torch.tensor([4.0, 1.0]))


def test_layer_norm_standardises_input():
    sae = eye_sae("relu")
    sae_ln = eye_sae("relu", normalize_input="layer_norm")
    x = torch.tensor([5.0, 1.0])  # mean 3, centred [2, -2], unbiased std 2*sqrt(2)
    std = 2 * 2**0.5
    torch.testing.assert_close(sae_ln.pre(x), torch.tensor([2.0, -2.0]) / (std + 1e-5))
    assert torch.equal(sae.pre(x), x)
    with pytest.raises(ValueError, match="pass the encoded x"):
        sae_ln.decode(sae_ln.encode(x))


@pytest.mark.parametrize(
    ("activation", "extra"),
    [("topk", {}), ("relu", {}), ("jumprelu", {}), ("topk", {"normalize_input": "layer_norm"})],
)
def test_decode_of_encode_is_forward(activation, extra):
    sae = random_sae(activation, k=3 if activation == "topk" else None, **extra)
    assert torch.equal(sae.decode(sae.encode(X), X), sae(X))


def test_shapes_and_compute_dtype():
    sae = random_sae().to(torch.bfloat16)
    a = sae.encode(X)
    assert a.shape == (5, 7, 16) and a.dtype == torch.bfloat16
    assert sae(X).shape == X.shape


# -- persistence -------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_save_load_round_trip_bf16(tmp_path, activation):
    sae = random_sae(activation, k=3 if activation == "topk" else None, hook_layer=4, model_name="tiny")
    folder = sae.save(tmp_path / "sae", dtype=torch.bfloat16)
    back = load_saelens_folder(folder)
    assert back.cfg == sae.cfg and back.dtype == torch.bfloat16
    for name, t in sae.state_for_saving().items():
        assert torch.equal(getattr(back, name), t.to(torch.bfloat16)), name
    assert torch.equal(back(X), sae.to(torch.bfloat16)(X))


def test_save_is_saelens_layout(tmp_path):
    import json

    folder = random_sae("relu", k=None, hook_layer=2).save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    # the SAELens pair, plus the record of what saealign wrote (so a later save never deletes other files)
    assert sorted(p.name for p in folder.iterdir()) == [".saealign-owned.json", "cfg.json", "sae_weights.safetensors"]
    assert (cfg["architecture"], cfg["hook_name"], cfg["d_in"], cfg["d_sae"]) == (
        "standard", "blocks.2.hook_resid_post", 8, 16
    )


# -- config validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"d_in": 0, "d_sae": 4, "activation": "relu"}, "widths must be positive"),
        ({"d_in": 4, "d_sae": 4, "activation": "gelu"}, "unknown SAE activation"),
        ({"d_in": 4, "d_sae": 4, "activation": "topk"}, "k=None"),
        ({"d_in": 4, "d_sae": 4, "activation": "topk", "k": 5}, "k=5"),
        ({"d_in": 4, "d_sae": 4, "activation": "relu", "normalize_input": "rms"}, "normalize_input"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(SaealignError, match=needle):
        SAEConfig(**kwargs)


def test_weight_shapes_checked_against_config():
    cfg = SAEConfig(d_in=4, d_sae=6, activation="relu")
    with pytest.raises(SaealignError, match=r"W_enc has shape \(6, 4\), expected \(4, 6\)"):
        SAE(cfg, W_enc=torch.zeros(6, 4))
    with pytest.raises(SaealignError, match="threshold has shape"):
        SAE(SAEConfig(d_in=4, d_sae=6, activation="jumprelu"), threshold=torch.zeros(4))
