"""Each loader reads a file written in its format's exact layout and reproduces that format's formula.

The expected values are the formats' own code re-implemented here with plain torch ops (SAELens
``StandardSAE``/``TopKSAE``/``JumpReLUSAE``, OpenAI ``sparse_autoencoder.model.Autoencoder``, the
Gemma Scope tutorial's ``JumpReLUSAE``), never through saealign's SAE methods. float64 keeps the
comparisons exact to 1e-12, so even a misplaced ``eps`` shows.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.sae.formats import check_sae_fits, load_sae
from saealign.sae.gemma_scope import load_gemma_scope_npz
from saealign.sae.openai_checkpoint import load_openai_checkpoint
from saealign.sae.releases import load_saelens_release
from saealign.sae.saelens import load_saelens_folder

D_IN, D_SAE = 6, 10
TOL = {"rtol": 1e-12, "atol": 1e-12}


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "W_enc": rand(D_IN, D_SAE, seed=seed),
        "b_enc": rand(D_SAE, seed=seed + 1, scale=0.3),
        "W_dec": rand(D_SAE, D_IN, seed=seed + 2),
        "b_dec": rand(D_IN, seed=seed + 3),
    }


X = rand(4, 3, D_IN, seed=99, scale=2.0)


# -- the formats' formulas, re-implemented ----------------------------------------------------------
def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = torch.topk(pre, k=k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))


def saelens_ref(x, w, act: str, apply_b_dec: bool = True, k: int = 0, threshold=None):
    sae_in = x - w["b_dec"] * apply_b_dec
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if act == "relu":
        a = F.relu(pre)
    elif act == "topk":
        a = topk_relu(pre, k)
    else:
        a = F.relu(pre) * (pre > threshold).to(pre.dtype)
    return a, a @ w["W_dec"] + w["b_dec"]


def openai_ref(x, sd, k: int, normalize: bool):
    mu = std = None
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = F.linear(x - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    a = topk_relu(pre, k) if k else F.relu(pre)
    recon = F.linear(a, sd["decoder.weight"]) + sd["pre_bias"]
    if normalize:
        recon = recon * std + mu
    return a, recon


def gemma_ref(x, p):
    pre = x @ p["W_enc"] + p["b_enc"]
    a = (pre > p["threshold"]) * F.relu(pre)
    return a, a @ p["W_dec"] + p["b_dec"]


# -- writers in each format's layout ---------------------------------------------------------------
def write_saelens(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_v5_cfg(**over) -> dict:
    """The keys SAELens 3-5 wrote into cfg.json."""
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float64",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_name": "blocks.6.hook_resid_post",
        "hook_layer": 6,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "3.0.0",
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        "context_size": 128,
        "normalize_activations": "none",
    }
    cfg.update(over)
    return cfg


def openai_sd(k: int | None = 3, activation: str = "TopK") -> dict:
    """What ``Autoencoder.state_dict()`` holds, as torch.save'd by openai/sparse_autoencoder."""
    sd = {
        "pre_bias": rand(D_IN, seed=10),
        "latent_bias": rand(D_SAE, seed=11, scale=0.3),
        "encoder.weight": rand(D_SAE, D_IN, seed=12),
        "decoder.weight": rand(D_IN, D_SAE, seed=13),
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "latents_activation_frequency": torch.ones(D_SAE),
        "latents_mean_square": torch.zeros(D_SAE),
        "activation": activation,
    }
    if activation == "TopK":
        sd["activation_state_dict"] = {"postact_fn": "ReLU"} | ({"k": k} if k is not None else {})
    return sd


def gemma_params(seed: int = 20) -> dict[str, np.ndarray]:
    w = weights(seed)
    thr = rand(D_SAE, seed=seed + 9).abs() * 0.5
    thr[:3] = torch.tensor([-0.4, 0.0, -1.0], dtype=torch.float64)  # negatives: the formula's relu matters
    return {k: v.numpy() for k, v in (w | {"threshold": thr}).items()}


def write_gemma(path: Path, params: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **params)
    return path


# -- SAELens --------------------------------------------------------------------------------------
def test_saelens_standard_relu_v5_layout(tmp_path):
    w = weights()
    sae = load_saelens_folder(write_saelens(tmp_path / "sae", saelens_v5_cfg(), w))
    a, recon = saelens_ref(X, w, "relu")
    torch.testing.assert_close(sae.encode(X), a, **TOL)
    torch.testing.assert_close(sae(X), recon, **TOL)
    assert (sae.cfg.activation, sae.cfg.hook_layer, sae.cfg.model_name) == ("relu", 6, "gpt2-small")
    assert sae.dtype == torch.float64


@pytest.mark.parametrize("stored", ["threshold", "log_threshold"])
def test_saelens_jumprelu_without_b_dec_on_input(tmp_path, stored):
    w = weights(1)
    if stored == "threshold":
        thr = rand(D_SAE, seed=7) * 0.5  # mixed signs: SAELens applies relu before the mask
        tensors = w | {"threshold": thr}
    else:
        log_thr = rand(D_SAE, seed=7) - 1.0
        thr, tensors = log_thr.exp(), w | {"log_threshold": log_thr}
    cfg = saelens_v5_cfg(architecture="jumprelu", apply_b_dec_to_input=False)
    sae = load_saelens_folder(write_saelens(tmp_path / "sae", cfg, tensors))
    a, recon = saelens_ref(X, w, "jumprelu", apply_b_dec=False, threshold=thr)
    assert (a > 0).any() and (a == 0).any()
    torch.testing.assert_close(sae.encode(X), a, **TOL)
    torch.testing.assert_close(sae(X), recon, **TOL)


def test_saelens_v6_topk_with_metadata_and_resid_pre(tmp_path):
    w = weights(2)
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 3,
        "dtype": "float64",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": "pythia-70m", "hook_name": "blocks.4.hook_resid_pre", "hook_layer": 4},
    }
    sae = load_saelens_folder(write_saelens(tmp_path / "sae", cfg, w))
    a, recon = saelens_ref(X, w, "topk", k=3)
    torch.testing.assert_close(sae.encode(X), a, **TOL)
    torch.testing.assert_close(sae(X), recon, **TOL)
    # the input of block 4 is the output of block 3
    assert (sae.cfg.k, sae.cfg.hook_layer, sae.cfg.model_name) == (3, 3, "pythia-70m")


def test_saelens_topk_as_activation_fn_kwargs(tmp_path):
    w = weights(3)
    cfg = saelens_v5_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 2})
    sae = load_saelens_folder(write_saelens(tmp_path / "sae", cfg, w))
    torch.testing.assert_close(sae(X), saelens_ref(X, w, "topk", k=2)[1], **TOL)
    assert (sae.encode(X) != 0).sum(-1).max() <= 2


def test_saelens_layer_norm_encode(tmp_path):
    w = weights(4)
    cfg = saelens_v5_cfg(normalize_activations="layer_norm")
    sae = load_saelens_folder(write_saelens(tmp_path / "sae", cfg, w))
    mu = X.mean(-1, keepdim=True)
    std = (X - mu).std(-1, keepdim=True)
    a, _ = saelens_ref((X - mu) / (std + 1e-5), w, "relu")
    assert sae.cfg.normalize_input == "layer_norm"
    torch.testing.assert_close(sae.encode(X), a, **TOL)


def test_saelens_round_trip_of_sae_save(tmp_path):
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="topk", k=4, hook_layer=2, metadata={"ev": 0.9})
    sae = SAE(cfg, **weights(5))
    back = load_saelens_folder(sae.save(tmp_path / "sae"))
    assert back.cfg == cfg
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, n), getattr(sae, n))
    assert torch.equal(back(X), sae(X))


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"architecture": "gated"}, "gated"),
        ({"architecture": "transcoder"}, "'transcoder'"),
        ({"normalize_activations": "expected_average_only_in"}, "expected_average_only_in"),
        ({"activation_fn_str": "tanh-relu"}, "'tanh-relu'"),
        ({"hook_name": "blocks.3.hook_mlp_out"}, "not the residual stream"),
        ({"hook_name": "blocks.0.hook_resid_pre"}, "embeddings"),
        ({"architecture": "topk", "activation_fn_kwargs": {}}, "k=None"),
    ],
)
def test_saelens_unsupported_configs(tmp_path, over, needle):
    with pytest.raises(SaealignError, match="sae") as err:
        load_saelens_folder(write_saelens(tmp_path / "sae", saelens_v5_cfg(**over), weights()))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_saelens_missing_pieces(tmp_path):
    w = weights()
    folder = write_saelens(tmp_path / "a", saelens_v5_cfg(architecture="jumprelu"), w)
    with pytest.raises(SaealignError, match="lack threshold"):
        load_saelens_folder(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SaealignError, match="lacks sae_weights.safetensors"):
        load_saelens_folder(folder)
    folder = write_saelens(tmp_path / "b", saelens_v5_cfg(), w)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SaealignError, match="not valid JSON"):
        load_saelens_folder(folder)
    wrong = write_saelens(tmp_path / "c", saelens_v5_cfg(d_in=D_IN + 1), w)
    with pytest.raises(SaealignError, match="W_enc has shape"):
        load_saelens_folder(wrong)


# -- OpenAI ------------------------------------------------------------------------------------------
def openai_path(tmp_path: Path, layer: int = 6, site: str = "resid_post_mlp") -> Path:
    path = tmp_path / f"{site}_v5_32k" / "autoencoders" / f"{layer}.pt"
    path.parent.mkdir(parents=True)
    return path


def test_openai_topk_latents_match_reference(tmp_path):
    sd = openai_sd(k=3)
    path = openai_path(tmp_path)
    torch.save(sd, path)
    sae = load_openai_checkpoint(path)
    a, _ = openai_ref(X, sd, k=3, normalize=True)
    torch.testing.assert_close(sae.encode(X), a, **TOL)
    c = sae.cfg
    assert (c.activation, c.k, c.normalize_input, c.apply_b_dec_to_input, c.hook_layer) == (
        "topk", 3, "layer_norm", True, 6
    )


def test_openai_topk_reconstruction_matches_reference(tmp_path):
    # Autoencoder.decode undoes LN with ``recon * std + mu`` (no eps); tiny inputs make eps visible
    sd = openai_sd(k=3)
    path = openai_path(tmp_path)
    torch.save(sd, path)
    sae = load_openai_checkpoint(path)
    x = X * 1e-3
    _, recon = openai_ref(x, sd, k=3, normalize=True)
    torch.testing.assert_close(sae(x), recon, **TOL)


def test_openai_relu_checkpoint_is_not_normalised(tmp_path):
    sd = openai_sd(activation="ReLU")
    path = tmp_path / "sae.pt"
    torch.save(sd, path)
    sae = load_openai_checkpoint(path)
    a, recon = openai_ref(X, sd, k=0, normalize=False)
    torch.testing.assert_close(sae.encode(X), a, **TOL)
    torch.testing.assert_close(sae(X), recon, **TOL)
    assert (sae.cfg.activation, sae.cfg.normalize_input, sae.cfg.hook_layer) == ("relu", "none", None)


def test_openai_stored_normalize_flag_wins(tmp_path):
    sd = openai_sd(k=2) | {"normalize": False}
    path = tmp_path / "sae.pth"
    torch.save(sd, path)
    sae = load_openai_checkpoint(path)
    torch.testing.assert_close(sae(X), openai_ref(X, sd, k=2, normalize=False)[1], **TOL)


def test_openai_missing_k_defaults_to_32(tmp_path):
    sd = openai_sd(k=None)
    sd["encoder.weight"] = rand(40, D_IN, seed=1)
    sd["decoder.weight"] = rand(D_IN, 40, seed=2)
    sd["latent_bias"] = rand(40, seed=3)
    path = tmp_path / "sae.pt"
    torch.save(sd, path)
    sae = load_openai_checkpoint(path)
    assert sae.cfg.k == 32 and "32" in sae.cfg.metadata["k_note"]


def test_openai_errors(tmp_path):
    sd = openai_sd()
    del sd["pre_bias"]
    torch.save(sd, tmp_path / "a.pt")
    with pytest.raises(SaealignError, match="lacks pre_bias"):
        load_openai_checkpoint(tmp_path / "a.pt")
    torch.save(openai_sd(), openai_path(tmp_path, site="resid_delta_mlp"))
    with pytest.raises(SaealignError, match="resid_delta_mlp"):
        load_openai_checkpoint(tmp_path / "resid_delta_mlp_v5_32k/autoencoders/6.pt")
    torch.save({"obj": types.SimpleNamespace(a=1)}, tmp_path / "b.pt")
    with pytest.raises(SaealignError, match="does not unpickle"):
        load_openai_checkpoint(tmp_path / "b.pt")
    torch.save(openai_sd(activation="Identity"), tmp_path / "c.pt")
    with pytest.raises(SaealignError, match="'Identity'"):
        load_openai_checkpoint(tmp_path / "c.pt")


# -- Gemma Scope ------------------------------------------------------------------------------------
def test_gemma_scope_matches_reference(tmp_path):
    params = gemma_params()
    path = write_gemma(tmp_path / "gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz", params)
    sae = load_gemma_scope_npz(path)
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    a, recon = gemma_ref(X, p)
    assert (a > 0).any() and (a == 0).any()
    torch.testing.assert_close(sae.encode(X), a, **TOL)
    torch.testing.assert_close(sae(X), recon, **TOL)
    c = sae.cfg
    assert (c.activation, c.apply_b_dec_to_input, c.hook_layer, c.hook_name) == (
        "jumprelu", False, 12, "blocks.12.hook_resid_post"
    )


def test_gemma_scope_folder_without_layer_and_errors(tmp_path):
    write_gemma(tmp_path / "mine/params.npz", gemma_params())
    sae = load_gemma_scope_npz(tmp_path / "mine")
    assert sae.cfg.hook_layer is None and sae.d_in == D_IN and sae.d_sae == D_SAE
    write_gemma(tmp_path / "gemma-scope-2b-pt-mlp/layer_3/params.npz", gemma_params())
    with pytest.raises(SaealignError, match="mlp SAE"):
        load_gemma_scope_npz(tmp_path / "gemma-scope-2b-pt-mlp/layer_3/params.npz")
    params = gemma_params()
    del params["threshold"]
    write_gemma(tmp_path / "x/params.npz", params)
    with pytest.raises(SaealignError, match="lacks threshold"):
        load_gemma_scope_npz(tmp_path / "x/params.npz")


def test_dtype_and_device_arguments(tmp_path):
    path = write_gemma(tmp_path / "params.npz", gemma_params())
    sae = load_gemma_scope_npz(path, dtype=torch.bfloat16, device="cpu")
    assert sae.dtype == torch.bfloat16 and sae.threshold.dtype == torch.bfloat16


# -- corrupt files ------------------------------------------------------------------------------------
def _saelens_weights(folder: Path) -> Path:
    return write_saelens(folder, saelens_v5_cfg(), weights()) / "sae_weights.safetensors"


def _openai(folder: Path) -> Path:
    folder.mkdir()
    torch.save(openai_sd(), folder / "sae.pt")
    return folder / "sae.pt"


def _gemma(folder: Path) -> Path:
    return write_gemma(folder / "params.npz", gemma_params())


@pytest.mark.parametrize("writer", [_saelens_weights, _openai, _gemma])
@pytest.mark.parametrize("damage", ["half", "garbage"])
def test_corrupt_weights_give_one_line(tmp_path, writer, damage):
    target = writer(tmp_path / "sae")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "half" else b"\x8f not weights \x00" * 40)
    spec = target.parent if target.name == "sae_weights.safetensors" else target
    with pytest.raises(SaealignError) as err:
        load_sae(spec)
    msg = str(err.value)
    assert msg.startswith(f"SAE weights at {target} are corrupt or truncated (")
    assert msg.endswith("re-download or re-train") and "\n" not in msg


# -- dispatch ------------------------------------------------------------------------------------------
def test_load_sae_dispatches_on_layout(tmp_path):
    folder = write_saelens(tmp_path / "lens", saelens_v5_cfg(), weights())
    npz = write_gemma(tmp_path / "gs/params.npz", gemma_params())
    pt = _openai(tmp_path / "oa")
    cases = {
        folder: "saelens",
        folder / "cfg.json": "saelens",
        str(npz.parent): "gemma_scope",
        npz: "gemma_scope",
        str(pt): "openai",
    }
    for spec, fmt in cases.items():
        assert load_sae(spec).cfg.metadata["format"] == fmt, spec


def test_load_sae_path_errors(tmp_path):
    with pytest.raises(SaealignError, match=f"no SAE at {tmp_path}/missing.pt"):
        load_sae(tmp_path / "missing.pt")
    with pytest.raises(SaealignError, match="no SAE at ./runs/sae"):
        load_sae("./runs/sae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaealignError, match="neither cfg.json"):
        load_sae(tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(SaealignError, match="cannot tell the SAE format"):
        load_sae(tmp_path / "w.bin")


def test_check_sae_fits():
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="relu"))
    check_sae_fits(sae, D_IN, "layer 3")
    with pytest.raises(SaealignError) as err:
        check_sae_fits(sae, 576, "layer 3")
    assert str(err.value) == (
        f"SAE d_in={D_IN} does not match the model's hidden size 576 (layer 3): "
        "use an SAE trained for this model"
    )


# -- sae-lens releases ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("gpt2-small-res-jb:blocks.8.hook_resid_pre", "'gpt2-small-res-jb'/'blocks.8.hook_resid_pre'"),
        ("gemma-scope-2b-pt-res/layer_3/width_16k", "'gemma-scope-2b-pt-res'/'layer_3/width_16k'"),
    ],
)
def test_release_without_sae_lens(monkeypatch, spec, parsed):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import sae_lens now raises ImportError
    with pytest.raises(SaealignError) as err:
        load_sae(spec)
    assert str(err.value) == (
        f"no SAE file or folder at {spec}; reading it as sae-lens release {parsed} needs the optional "
        "sae-lens package: pip install saealign[saelens]"
    )
    with pytest.raises(SaealignError, match=r"install saealign\[saelens\]"):
        load_saelens_release("gpt2-small-res-jb", "blocks.8.hook_resid_pre")


def fake_sae_lens(from_pretrained) -> types.ModuleType:
    mod = types.ModuleType("sae_lens")
    mod.SAE = types.SimpleNamespace(from_pretrained=from_pretrained)  # type: ignore[attr-defined]
    return mod


class LocalEntryNotFoundError(OSError):
    """Stands in for huggingface_hub's error when a file is neither cached nor downloadable."""


def test_release_offline_or_unreachable(monkeypatch):
    def offline(*args, **kwargs):
        raise ValueError("hub call failed") from LocalEntryNotFoundError("offline mode")

    monkeypatch.setitem(sys.modules, "sae_lens", fake_sae_lens(offline))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaealignError) as err:
        load_sae("gpt2-small-res-jb:blocks.8.hook_resid_pre")
    assert "HF_HUB_OFFLINE is set" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(SaealignError, match="hub is unreachable"):
        load_saelens_release("gpt2-small-res-jb", "blocks.8.hook_resid_pre")


def test_release_converts_sae_lens_object(monkeypatch):
    w = weights(8)
    thr = rand(D_SAE, seed=5).abs()
    cfg_dict = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "meta": {"model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post"},
    }
    obj = types.SimpleNamespace(cfg=types.SimpleNamespace(to_dict=lambda: cfg_dict), threshold=thr, **w)
    monkeypatch.setitem(sys.modules, "sae_lens", fake_sae_lens(lambda *a, **k: (obj, cfg_dict, None)))
    sae = load_sae("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical", dtype=torch.float64)
    expected = saelens_ref(X, w, "jumprelu", apply_b_dec=False, threshold=thr)[1]
    torch.testing.assert_close(sae(X), expected, **TOL)
    assert (sae.cfg.hook_layer, sae.cfg.model_name) == (12, "gemma-2-2b")
    assert sae.cfg.metadata["source"] == "gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical"
