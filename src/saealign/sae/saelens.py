"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``, the layout :meth:`SAE.save` writes) and
the SAELens config dict, which sae-lens releases share (:mod:`saealign.sae.releases`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from saealign.errors import SaealignError
from saealign.sae.autoencoder import CFG_FILE, SAE, WEIGHTS_FILE, SAEConfig
from saealign.sae.format_common import Device, build_sae, existing_path, failure_reason, read_weights

_SAELENS_ARCHS = ("standard", "topk", "jumprelu")
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def _hook_layer(hook_name: str, hook_layer: Any, source: str) -> int | None:
    """Block whose output the SAE reads: ``blocks.N.hook_resid_post`` -> N, ``..._pre`` -> N-1."""
    m = _RESID.match(hook_name)
    if m:
        n = int(m.group(1))
        if m.group(2) == "post":
            return n
        if n == 0:
            raise SaealignError(
                f"SAE at {source} reads {hook_name} (the embeddings): saealign edits a block's output, "
                "use an SAE trained after block 0 or later"
            )
        return n - 1  # the input of block N is the output of block N-1
    if _BLOCK_HOOK.match(hook_name):
        raise SaealignError(
            f"SAE at {source} reads {hook_name}, not the residual stream: saealign edits the residual "
            "stream after a block, use a hook_resid_post SAE"
        )
    return int(hook_layer) if hook_layer is not None else None


def saelens_config(cfg: dict[str, Any], source: str) -> SAEConfig:
    """Our :class:`SAEConfig` from a SAELens ``cfg.json`` dict (v3-v6 keys, or saealign's own)."""
    if isinstance(cfg.get("saealign"), dict):
        try:
            return SAEConfig(**cfg["saealign"])
        except TypeError as e:
            raise SaealignError(
                f"{source} was written by another saealign version ({e}): upgrade saealign"
            ) from e
    # SAELens v6 moved model/hook facts under "metadata" (on disk) or "meta" (cfg.to_dict())
    meta = cfg.get("metadata") or cfg.get("meta") or {}

    def get(key: str) -> Any:
        return cfg[key] if cfg.get(key) is not None else meta.get(key)

    if "d_in" not in cfg or "d_sae" not in cfg:
        raise SaealignError(f"{source} lacks d_in or d_sae: not a SAELens cfg.json")
    arch = cfg.get("architecture") or "standard"
    archs = ", ".join(_SAELENS_ARCHS)
    if arch == "gated":
        raise SaealignError(f"SAE at {source} is a gated SAE, which saealign does not support: use {archs}")
    if arch not in _SAELENS_ARCHS:
        raise SaealignError(f"SAE at {source} has architecture {arch!r}: saealign reads {archs} SAEs")
    fn = cfg.get("activation_fn_str") or ("topk" if arch == "topk" else "relu")
    if arch == "jumprelu":
        activation = "jumprelu"
    elif arch == "topk" or fn == "topk":
        activation = "topk"
    elif fn == "relu":
        activation = "relu"
    else:
        raise SaealignError(f"SAE at {source} uses activation {fn!r}: saealign reads relu, topk and jumprelu")
    k = cfg.get("k") if cfg.get("k") is not None else (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "layer_norm"):
        raise SaealignError(
            f"SAE at {source} expects inputs rescaled by normalize_activations={norm!r}, which saealign does "
            "not apply: fold the scaling into the weights and set it to none"
        )
    for flag in ("finetuning_scaling_factor", "rescale_acts_by_decoder_norm"):
        if cfg.get(flag):
            raise SaealignError(f"SAE at {source} sets {flag}, which saealign does not support")
    hook_name = str(get("hook_name") or "")
    try:
        return SAEConfig(
            d_in=int(cfg["d_in"]),
            d_sae=int(cfg["d_sae"]),
            activation=activation,  # type: ignore[arg-type]  # validated by SAEConfig
            k=int(k) if activation == "topk" and k is not None else None,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            normalize_input="layer_norm" if norm == "layer_norm" else "none",
            model_name=str(get("model_name") or ""),
            hook_layer=_hook_layer(hook_name, get("hook_layer"), source),
            hook_name=hook_name,
            metadata={"format": "saelens", "architecture": arch, "source": source},
        )
    except SaealignError as e:
        raise SaealignError(f"{source}: {e}") from e


def load_saelens_folder(path: str | Path, dtype: torch.dtype | None = None, device: Device = "cpu") -> SAE:
    """An SAE from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), e.g. :meth:`SAE.save`'s."""
    folder = existing_path(path)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise SaealignError(f"SAELens folder {folder} lacks {p.name}: re-download or re-save the SAE")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaealignError(f"{cfg_path} is not valid JSON ({failure_reason(e)}): re-download or re-save it") from e
    if not isinstance(raw, dict):
        raise SaealignError(f"{cfg_path} is not a JSON object: not a SAELens cfg.json")
    cfg = saelens_config(raw, str(folder))
    tensors = read_weights(weights_path, lambda p: load_file(str(p)))
    return build_sae(cfg, tensors, str(folder), dtype, device)
