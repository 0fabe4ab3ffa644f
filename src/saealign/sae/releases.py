"""SAEs from the sae-lens catalogue (``release:sae_id``) and the named presets it serves: the optional
``sae_lens`` package fetches them from the Hugging Face hub, so this module also owns telling "package
missing" from "hub unreachable", and never hanging on a dead network."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from saealign.errors import SaealignError
from saealign.hub import hub_offline
from saealign.sae.autoencoder import SAE
from saealign.sae.format_common import Device, build_sae, failure_reason
from saealign.sae.presets import SAEPreset, hub_needed
from saealign.sae.saelens import saelens_config

# huggingface_hub / requests / urllib3 names for "the hub cannot be reached"
_NETWORK_ERRORS = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "MaxRetryError", "NewConnectionError"}


def import_sae_lens(what: str) -> Any:
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
    sae_lens = import_sae_lens(f"sae-lens release {release!r}")
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
        raise SaealignError(f"sae-lens could not load {name} ({failure_reason(e)}): check the release and id") from e
    # sae-lens <= 6.x returns (sae, cfg_dict, sparsity); later versions return the SAE alone
    obj = got[0] if isinstance(got, tuple) else got
    cfg = saelens_config(obj.cfg.to_dict(), name)
    tensors = {
        n: getattr(obj, n).detach().cpu()
        for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        if isinstance(getattr(obj, n, None), Tensor)
    }
    return build_sae(cfg, tensors, name, dtype, device)


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
