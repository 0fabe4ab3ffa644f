"""Read public SAE formats into :class:`saealign.sae.autoencoder.SAE`, reproducing each format's own formula.

| format | file | formula switches |
| --- | --- | --- |
| SAELens folder | ``cfg.json`` + ``sae_weights.safetensors`` | from ``cfg.json`` |
| OpenAI sparse_autoencoder | ``torch.save``'d state dict (``.pt``) | ``b_dec`` subtracted; TopK: LN |
| Gemma Scope | ``params.npz`` | JumpReLU; ``b_dec`` *not* subtracted from the input |
| sae-lens release | ``release:sae_id`` via the optional ``sae_lens`` package | from its config |

:func:`load_sae` picks the format from a path or release name. Every reader turns an unreadable file
into one :class:`SaealignError` line instead of a library traceback.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from saealign.errors import SaealignError
from saealign.hub import hub_offline
from saealign.sae.autoencoder import CFG_FILE, SAE, WEIGHTS_FILE, SAEConfig
from saealign.sae.presets import SAEPreset, find_preset, hub_needed

GEMMA_FILE = "params.npz"
_OPENAI_SUFFIXES = (".pt", ".pth")
_OPENAI_DEFAULT_K = 32  # every TopK GPT-2 SAE OpenAI published uses k=32
_SAELENS_ARCHS = ("standard", "topk", "jumprelu")
# huggingface_hub / requests / urllib3 names for "the hub cannot be reached"
_NETWORK_ERRORS = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "MaxRetryError", "NewConnectionError"}

T = TypeVar("T")
Device = str | torch.device


# -- checks ----------------------------------------------------------------------------------
def check_sae_fits(sae: SAE, d_model: int, where: str) -> None:
    """Raise if the SAE reads a residual stream of another width than the model's ``d_model``."""
    if sae.d_in != d_model:
        raise SaealignError(
            f"SAE d_in={sae.d_in} does not match the model's hidden size {d_model} ({where}): "
            "use an SAE trained for this model"
        )


def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SaealignError(f"no SAE at {p}: the path does not exist")
    return p


def _why(e: BaseException) -> str:
    # torch wraps unpickling failures in a long advisory; the inner error says what is wrong
    inner = e.__context__ if isinstance(e.__context__, Exception) and str(e.__context__) else e
    lines = str(inner).strip().splitlines()
    text = lines[0].split(". ")[0][:160] if lines else ""  # first sentence: the rest is advice
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def _read(path: Path, reader: Callable[[Path], T]) -> T:
    """Run ``reader(path)``, turning any parse failure into one 'corrupt or truncated' line."""
    try:
        return reader(path)
    except (SaealignError, MemoryError):
        raise
    except Exception as e:
        raise SaealignError(
            f"SAE weights at {path} are corrupt or truncated ({_why(e)}): re-download or re-train"
        ) from e


def _build(
    cfg: SAEConfig, tensors: dict[str, Tensor], source: str, dtype: torch.dtype | None, device: Device
) -> SAE:
    """An SAE from named weights (``W_enc [d_in, d_sae]`` ...), cast to ``dtype`` (else W_enc's)."""
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if cfg.activation == "jumprelu":
        if "threshold" not in tensors and "log_threshold" in tensors:
            # SAELens training checkpoints keep the threshold in log space
            tensors = {**tensors, "threshold": tensors["log_threshold"].float().exp()}
        needed.append("threshold")
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise SaealignError(
            f"SAE weights at {source} lack {', '.join(missing)}: not a {cfg.activation} SAE file"
        )
    target = dtype or tensors["W_enc"].dtype
    weights = {n: tensors[n].to(target) for n in needed}
    if "threshold" in weights:
        # SAELens and Gemma Scope compute relu(γ)·[γ > θ]; for θ < 0 that equals γ·[γ > max(θ, 0)],
        # the form SAE.activate uses, so clamping keeps their formula exact.
        weights["threshold"] = weights["threshold"].clamp(min=0)
    return SAE(cfg, **weights).to(device)


# -- SAELens folders ---------------------------------------------------------------------------
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
    folder = _existing(path)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise SaealignError(f"SAELens folder {folder} lacks {p.name}: re-download or re-save the SAE")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaealignError(f"{cfg_path} is not valid JSON ({_why(e)}): re-download or re-save it") from e
    if not isinstance(raw, dict):
        raise SaealignError(f"{cfg_path} is not a JSON object: not a SAELens cfg.json")
    cfg = saelens_config(raw, str(folder))
    tensors = _read(weights_path, lambda p: load_file(str(p)))
    return _build(cfg, tensors, str(folder), dtype, device)


# -- OpenAI sparse_autoencoder -----------------------------------------------------------------
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
    path = _existing(path)
    sd = _read(path, _torch_load)
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
    return _build(cfg, tensors, str(path), dtype, device)


# -- Gemma Scope -------------------------------------------------------------------------------
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
    path = _existing(path)
    if path.is_dir():
        path = path / GEMMA_FILE
        if not path.is_file():
            raise SaealignError(f"folder {path.parent} has no {GEMMA_FILE}: not a Gemma Scope SAE folder")
    for part in path.parts:
        m = _GEMMA_SUBLAYER.match(part)
        if m:
            raise SaealignError(f"{path} is a Gemma Scope {m.group(1)} SAE, not a residual one: use -res")
    arrays = _read(path, _read_npz)
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
    return _build(cfg, tensors, str(path), dtype, device)


# -- sae-lens releases (optional package, needs the hub) ----------------------------------------
def _import_sae_lens(what: str) -> Any:
    try:
        import sae_lens
    except ImportError as e:
        msg = f"{what} needs the optional sae-lens package: pip install saealign[saelens]"
        raise SaealignError(msg) from e
    return sae_lens


def _is_network_error(e: BaseException) -> bool:
    seen: BaseException | None = e
    for _ in range(10):  # walk the cause chain; requests/urllib3 wrap the socket error
        if seen is None:
            return False
        if isinstance(seen, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if type(seen).__name__ in _NETWORK_ERRORS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_resolves(timeout_s: float = 3.0) -> bool:
    """Whether the hub's host name resolves (looked up in a thread: a dead resolver must not hang us)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    result: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


@contextlib.contextmanager
def _cache_only_when_unreachable() -> Iterator[None]:
    """Run huggingface_hub from its cache alone where the hub is off (env) or its host does not resolve.

    A cached SAE still loads; a missing one fails at once instead of after ~30 s of retries. The
    library reads its offline flag at import time, so the flag itself is switched, and restored.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or (not hub_offline() and _hub_resolves()):
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def load_saelens_release(
    release: str, sae_id: str, dtype: torch.dtype | None = None, device: Device = "cpu"
) -> SAE:
    """An SAE from the sae-lens catalogue (``SAE.from_pretrained(release, sae_id)``), via the hub."""
    sae_lens = _import_sae_lens(f"sae-lens release {release!r}")
    name = f"{release}:{sae_id}"
    try:
        with _cache_only_when_unreachable():
            got = sae_lens.SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:
        if hub_offline() or _is_network_error(e):
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub is unreachable"
            raise SaealignError(
                f"cannot fetch sae-lens release {name}: {why}; download it where the hub is reachable and "
                "pass the SAE folder's path"
            ) from e
        raise SaealignError(f"sae-lens could not load {name} ({_why(e)}): check the release and id") from e
    # sae-lens <= 6.x returns (sae, cfg_dict, sparsity); later versions return the SAE alone
    obj = got[0] if isinstance(got, tuple) else got
    cfg = saelens_config(obj.cfg.to_dict(), name)
    tensors = {
        n: getattr(obj, n).detach().cpu()
        for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        if isinstance(getattr(obj, n, None), Tensor)
    }
    return _build(cfg, tensors, name, dtype, device)


# -- dispatch ------------------------------------------------------------------------------------
_FILE_SUFFIXES = (".npz", ".safetensors", ".json", *_OPENAI_SUFFIXES)


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
    if suffix in _OPENAI_SUFFIXES:
        return load_openai_checkpoint(path, dtype, device)
    if path.name in (CFG_FILE, WEIGHTS_FILE):
        return load_saelens_folder(path.parent, dtype, device)
    raise SaealignError(
        f"cannot tell the SAE format of {path}: expected a SAELens folder, Gemma Scope .npz or OpenAI .pt"
    )


def load_preset(preset: SAEPreset, layer: int, dtype: torch.dtype | None = None, device: Device = "cpu") -> SAE:
    """A preset's SAE (:mod:`saealign.sae.presets`) through sae-lens and the hub; one line naming the hub
    where the package or the hub is missing."""
    try:
        import sae_lens  # noqa: F401  # only to tell a missing package from a missing hub
    except ImportError:
        raise hub_needed(preset, layer, "the optional sae-lens package is not installed "
                         "(pip install saealign[saelens])") from None
    release, _, sae_id = preset.sae_spec(layer).partition(":")
    try:
        return load_saelens_release(release, sae_id, dtype, device)
    except SaealignError as e:
        if "hub" in str(e):
            raise hub_needed(preset, layer, "it cannot be reached from here") from e
        raise


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
    _import_sae_lens(what)
    return load_saelens_release(release[0], release[1], dtype, device)
