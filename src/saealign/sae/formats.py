"""Read public SAE formats into :class:`saealign.sae.autoencoder.SAE`, reproducing each format's own formula.

| format | file | formula switches |
| --- | --- | --- |
| SAELens folder | ``cfg.json`` + ``sae_weights.safetensors`` | from ``cfg.json`` |
| OpenAI sparse_autoencoder | ``torch.save``'d state dict (``.pt``) | ``b_dec`` subtracted; TopK: LN |
| Gemma Scope | ``params.npz`` | JumpReLU; ``b_dec`` *not* subtracted from the input |
| sae-lens release | ``release:sae_id`` via the optional ``sae_lens`` package | from its config |

:func:`load_sae` picks the format from a path or release name. Every reader turns an unreadable file
into one :class:`SaealignError` line instead of a library traceback. Each format's reader lives in its own
module (``saelens``, ``openai_checkpoint``, ``gemma_scope``, ``releases``); this one dispatches, and
owns the check that a loaded SAE fits the model it will edit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saealign.errors import SaealignError
from saealign.sae.autoencoder import CFG_FILE, SAE, WEIGHTS_FILE
from saealign.sae.format_common import Device
from saealign.sae.gemma_scope import GEMMA_FILE, load_gemma_scope_npz
from saealign.sae.openai_checkpoint import OPENAI_SUFFIXES, load_openai_checkpoint
from saealign.sae.presets import find_preset
from saealign.sae.releases import import_sae_lens, load_preset, load_saelens_release
from saealign.sae.saelens import load_saelens_folder


def check_sae_fits(sae: SAE, d_model: int, where: str) -> None:
    """Raise if the SAE reads a residual stream of another width than the model's ``d_model``."""
    if sae.d_in != d_model:
        raise SaealignError(
            f"SAE d_in={sae.d_in} does not match the model's hidden size {d_model} ({where}): "
            "use an SAE trained for this model"
        )


# -- dispatch ------------------------------------------------------------------------------------
_FILE_SUFFIXES = (".npz", ".safetensors", ".json", *OPENAI_SUFFIXES)


def _release_spec(spec: str | Path) -> tuple[str, str] | None:
    """``release:sae_id`` or ``release/sae_id`` -> (release, sae_id); None when it reads as a path."""
    if isinstance(spec, Path):
        return None
    text = spec.strip()
    if text.startswith(("/", ".", "~")) or text.endswith(_FILE_SUFFIXES):
        return None
    release, sep, sae_id = text.partition(":") if ":" in text else text.partition("/")
    return (release, sae_id) if sep and release and sae_id else None


def _load_path(path: Path, dtype: torch.dtype | None, device: Device) -> SAE:
    if path.is_dir():
        if (path / CFG_FILE).is_file():
            return load_saelens_folder(path, dtype, device)
        if (path / GEMMA_FILE).is_file():
            return load_gemma_scope_npz(path, dtype, device)
        raise SaealignError(
            f"folder {path} has neither {CFG_FILE} (SAELens) nor {GEMMA_FILE} (Gemma Scope): "
            "point at an SAE folder or file"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_gemma_scope_npz(path, dtype, device)
    if suffix in OPENAI_SUFFIXES:
        return load_openai_checkpoint(path, dtype, device)
    if path.name in (CFG_FILE, WEIGHTS_FILE):
        return load_saelens_folder(path.parent, dtype, device)
    raise SaealignError(
        f"cannot tell the SAE format of {path}: expected a SAELens folder, Gemma Scope .npz or OpenAI .pt"
    )


def load_sae(spec: str | Path, dtype: torch.dtype | None = None, device: Device = "cpu") -> SAE:
    """Load an SAE from a path (SAELens folder, Gemma Scope ``.npz``, OpenAI ``.pt``), a preset
    (``gpt2-small-oai-v5-32k:9``, see :mod:`saealign.sae.presets`) or a sae-lens ``release:sae_id``
    (``release/sae_id`` also works when no such path exists).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path, dtype, device)
    preset = find_preset(spec) if isinstance(spec, str) else None
    if preset is not None:
        return load_preset(*preset, dtype=dtype, device=device)
    release = _release_spec(spec)
    if release is None:
        raise SaealignError(f"no SAE at {spec}: the path does not exist")
    what = f"no SAE file or folder at {spec}; reading it as sae-lens release {release[0]!r}/{release[1]!r}"
    import_sae_lens(what)
    return load_saelens_release(release[0], release[1], dtype, device)
