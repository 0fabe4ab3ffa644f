"""Gemma Scope SAEs (``params.npz``): JumpReLU, with ``b_dec`` *not* subtracted from the input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.sae.format_common import Device, build_sae, existing_path, read_weights

GEMMA_FILE = "params.npz"
_GEMMA_LAYER = re.compile(r"^layer_(\d+)$")
_GEMMA_SUBLAYER = re.compile(r"^gemma-scope-.*-(mlp|att)(-|$)")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_gemma_scope_npz(path: str | Path, dtype: torch.dtype | None = None, device: Device = "cpu") -> SAE:
    """An SAE from a Gemma Scope ``params.npz`` (or its folder).

    Arrays: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``;
    ``a = relu(γ)·[γ > θ]`` with ``γ = x @ W_enc + b_enc`` (no ``b_dec`` subtracted from ``x``).
    The layer comes from a ``layer_N`` folder in the path (Gemma Scope's naming), else None.
    """
    path = existing_path(path)
    if path.is_dir():
        path = path / GEMMA_FILE
        if not path.is_file():
            raise SaealignError(f"folder {path.parent} has no {GEMMA_FILE}: not a Gemma Scope SAE folder")
    for part in path.parts:
        m = _GEMMA_SUBLAYER.match(part)
        if m:
            raise SaealignError(f"{path} is a Gemma Scope {m.group(1)} SAE, not a residual one: use -res")
    arrays = read_weights(path, _read_npz)
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in arrays]
    if missing:
        raise SaealignError(f"{path} lacks {', '.join(missing)}: not a Gemma Scope params.npz")
    if arrays["W_enc"].ndim != 2:
        raise SaealignError(f"{path}: W_enc has shape {arrays['W_enc'].shape}, expected [d_in, d_sae]")
    d_in, d_sae = arrays["W_enc"].shape
    layer = next((int(m.group(1)) for p in path.parts if (m := _GEMMA_LAYER.match(p))), None)
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        activation="jumprelu",
        apply_b_dec_to_input=False,
        hook_layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post" if layer is not None else "",
        metadata={"format": "gemma_scope", "source": str(path)},
    )
    tensors = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}
    return build_sae(cfg, tensors, str(path), dtype, device)
