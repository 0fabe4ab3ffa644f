"""Named SAEs that users of the paper expect, with the model each one reads: ``NAME:LAYER``.

``gpt2-small-oai-v5-32k:9`` is OpenAI's GPT-2 small TopK SAE (32k latents, k=32) on the residual stream
after block 9 (OpenAI's ``resid_post_mlp`` site, SAELens' ``blocks.9.hook_resid_post``), as in the paper
(layers 0 and 9). Neither GPT-2 nor these SAEs ship in a wheel, so a preset needs the Hugging Face hub
once (through the optional ``sae-lens`` package, which caches what it fetches); offline it says so in
one line and names the file that works without a hub: OpenAI's own checkpoint
(``resid_post_mlp_v5_32k/autoencoders/9.pt`` in their ``sparse_autoencoder`` release), which
:func:`saealign.sae.formats.load_sae` reads from a path. This module is data; ``load_sae`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from saealign.errors import SaealignError


@dataclass(frozen=True)
class SAEPreset:
    """A published family of SAEs (one per layer) and the model they were trained on."""

    name: str
    """What users type before ``:LAYER``."""
    title: str
    """One line for people."""
    model: str
    """Hub id of the model the SAEs read."""
    release: str
    """The sae-lens release that serves the SAEs from the hub."""
    sae_id: str
    """The SAE's id in that release; ``{layer}`` is filled in."""
    layers: tuple[int, ...]
    """Layers the release has."""
    default_layer: int
    """The layer used when none is named."""
    offline_file: str
    """The original checkpoint to download and pass as a path where no hub is reachable; ``{layer}``."""

    def sae_spec(self, layer: int) -> str:
        return f"{self.release}:{self.sae_id.format(layer=layer)}"


PRESETS: dict[str, SAEPreset] = {
    p.name: p
    for p in (
        SAEPreset(
            name="gpt2-small-oai-v5-32k",
            title="OpenAI's GPT-2 small TopK SAEs, 32k latents, residual stream after each block (v5, resid_post_mlp)",
            model="openai-community/gpt2",
            release="gpt2-small-resid-post-v5-32k",
            sae_id="blocks.{layer}.hook_resid_post",
            layers=tuple(range(12)),
            default_layer=9,  # the paper's layers are 0 and 9
            offline_file="OpenAI sparse_autoencoder gpt2-small/resid_post_mlp_v5_32k/autoencoders/{layer}.pt",
        ),
    )
}


def find_preset(spec: str) -> tuple[SAEPreset, int] | None:
    """``NAME`` or ``NAME:LAYER`` -> (preset, layer); None when ``spec`` names no preset."""
    name, sep, layer_text = spec.strip().partition(":")
    preset = PRESETS.get(name)
    if preset is None:
        return None
    if not sep:
        return preset, preset.default_layer
    if not layer_text.isdigit() or int(layer_text) not in preset.layers:
        raise SaealignError(
            f"{preset.name} has SAEs for layers {preset.layers[0]}..{preset.layers[-1]}, got {layer_text!r}: "
            f"use {preset.name}:LAYER"
        )
    return preset, int(layer_text)


def hub_needed(preset: SAEPreset, layer: int, why: str) -> SaealignError:
    """The one line a preset gives where its files cannot be fetched."""
    return SaealignError(
        f"SAE preset {preset.name}:{layer} ({preset.model} + sae-lens release {preset.release}) needs the "
        f"Hugging Face hub, and {why}: run it once where the hub is reachable (it is cached), or download "
        f"{preset.offline_file.format(layer=layer)} and pass its path as the SAE, with a local copy of "
        f"{preset.model} as the model"
    )
