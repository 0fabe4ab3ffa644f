"""What every SAE format reader shares: the path check, one error line for an unreadable file, and
building an :class:`~saealign.sae.autoencoder.SAE` from named weights.

The readers themselves live one format per module (``saelens``, ``openai_checkpoint``, ``gemma_scope``,
``releases``); :mod:`saealign.sae.formats` picks among them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE, SAEConfig

T = TypeVar("T")
Device = str | torch.device


def existing_path(path: str | Path) -> Path:
    """``path`` (``~`` expanded), or one line saying nothing is there."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SaealignError(f"no SAE at {p}: the path does not exist")
    return p


def failure_reason(e: BaseException) -> str:
    """``"ErrorType: first sentence"`` of a library error, for one-line messages."""
    # torch wraps unpickling failures in a long advisory; the inner error says what is wrong
    inner = e.__context__ if isinstance(e.__context__, Exception) and str(e.__context__) else e
    lines = str(inner).strip().splitlines()
    text = lines[0].split(". ")[0][:160] if lines else ""  # first sentence: the rest is advice
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def read_weights(path: Path, reader: Callable[[Path], T]) -> T:
    """Run ``reader(path)``, turning any parse failure into one 'corrupt or truncated' line."""
    try:
        return reader(path)
    except (SaealignError, MemoryError):
        raise
    except Exception as e:
        raise SaealignError(
            f"SAE weights at {path} are corrupt or truncated ({failure_reason(e)}): re-download or re-train"
        ) from e


def build_sae(
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
