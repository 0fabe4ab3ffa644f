"""OpenAI ``sparse_autoencoder`` checkpoints (their GPT-2 SAEs): a ``torch.save``'d state dict, read with
the tensors-only loader (never an unpickle of arbitrary objects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.sae.format_common import Device, build_sae, existing_path, read_weights

OPENAI_SUFFIXES = (".pt", ".pth")  # what torch.save writes; load_sae routes these here
_OPENAI_DEFAULT_K = 32  # every TopK GPT-2 SAE OpenAI published uses k=32

# OpenAI's GPT-2 folders are named "{location}_v{n}_{size}/autoencoders/{layer}.pt"; only
# resid_post_mlp is a block's output (the others are mid-block or a sublayer's delta).
_OPENAI_OTHER_SITES = ("resid_post_attn", "resid_delta_attn", "resid_delta_mlp", "mlp_post_act")


def _openai_layer(path: Path) -> int | None:
    site = next((s for s in _OPENAI_OTHER_SITES if s in str(path)), None)
    if site:
        raise SaealignError(
            f"{path} is an SAE of {site}, not of a block's output: use a resid_post_mlp SAE"
        )
    return int(path.stem) if path.stem.isdigit() else None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e.__context__ or ""):
            raise SaealignError(
                f"checkpoint {path} holds Python objects besides tensors, which saealign does not unpickle "
                "(unsafe): re-save it as a state dict of tensors"
            ) from e
        raise


def load_openai_checkpoint(path: str | Path, dtype: torch.dtype | None = None, device: Device = "cpu") -> SAE:
    """An SAE from an OpenAI ``sparse_autoencoder`` state dict (``torch.save``'d ``Autoencoder``).

    Keys: ``pre_bias [d_in]``, ``latent_bias [d_sae]``, ``encoder.weight [d_sae, d_in]``,
    ``decoder.weight [d_in, d_sae]``, ``activation`` ("TopK"/"ReLU"), ``activation_state_dict``
    ``{"k": 32, "postact_fn": "ReLU"}``, optionally ``normalize``. Their model computes
    ``TopK(LN(x) - pre_bias) @ encoder.weight.T + latent_bias``, ``recon = a @ decoder.weight.T +
    pre_bias`` then ``recon * std + mu``; mapped as ``W_enc = encoder.weight.T``, ``b_enc =
    latent_bias``, ``W_dec = decoder.weight.T``, ``b_dec = pre_bias``.
    """
    path = existing_path(path)
    sd = read_weights(path, _torch_load)
    if not isinstance(sd, dict):
        raise SaealignError(f"{path} holds a {type(sd).__name__}, not an OpenAI SAE state dict")
    missing = [k for k in ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight") if k not in sd]
    if missing:
        raise SaealignError(f"{path} lacks {', '.join(missing)}: not an OpenAI sparse_autoencoder checkpoint")
    act_name = sd.get("activation", "ReLU")
    act_sd = sd.get("activation_state_dict") or {}
    metadata: dict[str, Any] = {"format": "openai", "source": str(path)}
    if act_name == "TopK":
        postact = act_sd.get("postact_fn", "ReLU")
        if postact != "ReLU":
            raise SaealignError(f"{path} applies {postact} after TopK; saealign supports ReLU there only")
        k = act_sd.get("k")
        if k is None:
            k = _OPENAI_DEFAULT_K
            metadata["k_note"] = f"checkpoint stores no k; assumed {k}, OpenAI's GPT-2 TopK default"
        activation, k = "topk", int(k)
    elif act_name == "ReLU":
        activation, k = "relu", None
    else:
        raise SaealignError(f"{path} uses activation {act_name!r}: saealign reads TopK and ReLU OpenAI SAEs")
    # Autoencoder.from_state_dict turns input standardisation on exactly for TopK; a stored flag wins
    normalize = bool(sd.get("normalize", act_name == "TopK"))
    enc = sd["encoder.weight"]
    if enc.dim() != 2:
        raise SaealignError(f"{path}: encoder.weight has shape {tuple(enc.shape)}, expected [d_sae, d_in]")
    d_sae, d_in = enc.shape
    layer = _openai_layer(path)
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        activation=activation,  # type: ignore[arg-type]  # validated by SAEConfig
        k=k,
        apply_b_dec_to_input=True,
        normalize_input="layer_norm" if normalize else "none",
        hook_layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post" if layer is not None else "",
        metadata=metadata,
    )
    tensors = {
        "W_enc": enc.T.contiguous(),
        "b_enc": sd["latent_bias"],
        "W_dec": sd["decoder.weight"].T.contiguous(),
        "b_dec": sd["pre_bias"],
    }
    return build_sae(cfg, tensors, str(path), dtype, device)
