"""Round trips with the real ``sae-lens`` package: it reads our folders, we read its folders, same maths.

``sae-lens`` is an optional extra (``pip install saealign[saelens]``, part of ``dev``, so CI has it);
without it these tests skip, except in CI, where a missing package is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from saealign.defaults import DEFAULT_SAE_DIR
from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.sae.formats import load_sae
from saealign.sae.presets import PRESETS, find_preset
from saealign.sae.saelens import load_saelens_folder

if os.environ.get("CI"):
    import sae_lens
else:
    sae_lens = pytest.importorskip("sae_lens")

from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig  # noqa: E402

D_IN, D_SAE = 16, 48
ARCHS = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 5}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
}


def max_diff(ours: SAE, theirs: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Max |encode| and |decode| differences; the active latents must be the same set."""
    with torch.no_grad():
        a_ours, a_theirs = ours.encode(x), theirs.encode(x)
        assert torch.equal(a_ours != 0, a_theirs != 0)
        r_ours, r_theirs = ours.decode(a_ours, x), theirs.decode(a_theirs)
    return (a_ours - a_theirs).abs().max().item(), (r_ours - r_theirs).abs().max().item()


def assert_same_maths(ours: SAE, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    enc, dec = max_diff(ours, theirs, x)
    scale = x.abs().max().item()
    # the same formula in the same order gives the same bits; allow float reassociation, nothing more
    assert enc <= 1e-5 * scale and dec <= 1e-5 * scale, (enc, dec)


def sae_lens_sae(arch: str, norm: str, seed: int = 0) -> torch.nn.Module:
    """A sae-lens SAE of ``arch`` with random weights (positive thresholds), reading block 3's output."""
    cls, cfg_cls, extra = ARCHS[arch]
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, normalize_activations=norm,
                  metadata=SAEMetadata(model_name="tiny", hook_name="blocks.3.hook_resid_post"), **extra)
    sae = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if name == "threshold":
                p.abs_()
    return sae


X = torch.randn(4, 9, D_IN, generator=torch.Generator().manual_seed(1)) * 2


@pytest.mark.real
@pytest.mark.parametrize("layer", [6, 15])
def test_sae_lens_loads_our_shipped_sae(layer: int) -> None:
    folder = DEFAULT_SAE_DIR / f"layer_{layer}"
    ours = load_saelens_folder(folder, dtype=torch.float32)
    theirs = sae_lens.SAE.load_from_disk(folder, dtype="float32")
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == ours.cfg.k
    assert theirs.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
    # inputs at the scale of the real residual stream (SmolLM2's median norm is ~170 at block 15)
    x = torch.randn(64, ours.d_in, generator=torch.Generator().manual_seed(layer)) * 7
    enc, dec = max_diff(ours, theirs, x)
    print(f"layer {layer}: sae-lens vs saealign max abs diff encode {enc:.3g} decode {dec:.3g}")
    assert_same_maths(ours, theirs, x)


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_we_load_what_sae_lens_saved(tmp_path: Path, arch: str, norm: str) -> None:
    theirs = sae_lens_sae(arch, norm)
    theirs.save_model(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae", dtype=torch.float32)
    expected = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    assert (ours.cfg.activation, ours.cfg.hook_layer, ours.cfg.model_name) == (expected, 3, "tiny")
    assert ours.cfg.normalize_input == norm
    assert_same_maths(ours, theirs, X)


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sae_lens_loads_what_we_saved(tmp_path: Path, arch: str, norm: str) -> None:
    g = torch.Generator().manual_seed(2)
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, k=5 if arch == "topk" else None,  # type: ignore[arg-type]
                    normalize_input=norm, hook_layer=3, model_name="tiny")  # type: ignore[arg-type]
    ours = SAE(cfg, W_enc=torch.randn(D_IN, D_SAE, generator=g), b_enc=torch.randn(D_SAE, generator=g) * 0.1,
               W_dec=torch.randn(D_SAE, D_IN, generator=g), b_dec=torch.randn(D_IN, generator=g),
               threshold=torch.rand(D_SAE, generator=g) if arch == "jumprelu" else None)
    theirs = sae_lens.SAE.load_from_disk(ours.save(tmp_path / "sae"))
    assert type(theirs) is ARCHS[arch][0]
    assert theirs.cfg.normalize_activations == norm and theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert_same_maths(ours, theirs, X)


def test_a_different_sae_is_told_apart(tmp_path: Path) -> None:
    """The comparison can fail: another seed's weights give other latents."""
    sae_lens_sae("topk", "none", seed=0).save_model(tmp_path / "a")
    ours = load_sae(tmp_path / "a")
    with pytest.raises(AssertionError):
        assert_same_maths(ours, sae_lens_sae("topk", "none", seed=1), X)


# -- the GPT-2 small + OpenAI v5 32k preset: needs the hub, and says so -----------------------------------
@pytest.mark.parametrize("layer", [0, 9])
def test_gpt2_openai_preset_offline_says_a_hub_is_needed(layer: int, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaealignError) as err:
        load_sae(f"gpt2-small-oai-v5-32k:{layer}")
    message = str(err.value)
    assert "\n" not in message and "needs the Hugging Face hub" in message
    assert f"resid_post_mlp_v5_32k/autoencoders/{layer}.pt" in message and "openai-community/gpt2" in message


def test_preset_names_and_layers() -> None:
    preset = PRESETS["gpt2-small-oai-v5-32k"]
    assert find_preset("gpt2-small-oai-v5-32k") == (preset, 9)
    assert find_preset("gpt2-small-oai-v5-32k:0") == (preset, 0)
    assert preset.sae_spec(9) == "gpt2-small-resid-post-v5-32k:blocks.9.hook_resid_post"
    assert find_preset("gpt2-small-res-jb:blocks.8.hook_resid_pre") is None
    with pytest.raises(SaealignError, match="layers 0..11"):
        find_preset("gpt2-small-oai-v5-32k:12")
    # the release the preset names is in sae-lens' own catalogue, with these layers
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    entry = get_pretrained_saes_directory()[preset.release]
    assert {preset.sae_id.format(layer=layer) for layer in preset.layers} <= set(entry.saes_map)
    assert entry.model == "gpt2-small"


def test_preset_without_sae_lens_still_names_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(SaealignError, match=r"needs the Hugging Face hub.*pip install saealign\[saelens\]"):
        load_sae("gpt2-small-oai-v5-32k:9")
