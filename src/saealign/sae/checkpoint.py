"""Training checkpoints as ``checkpoint.safetensors`` + ``checkpoint.json``: nothing is ever unpickled.

A checkpoint is a nested state (dicts, lists, tuples, numbers, strings, tensors), such as an optimiser's
``state_dict()``. Tensors go to one safetensors file under generated names; everything else goes to
JSON with each tensor replaced by ``{"$tensor": name}``. ``torch.load`` of a pickle would run any code
a planted file holds; these two formats only ever yield tensors and plain values.

JSON keys are strings, so a dict with other keys (an optimiser's ``{0: {...}}``) is stored as
``{"$items": [[key, value], ...]}`` and tuples as ``{"$tuple": [...]}``: a load returns exactly the
structure that was saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saealign.cache import atomic_dir
from saealign.errors import SaealignError

TENSORS_FILE = "checkpoint.safetensors"
META_FILE = "checkpoint.json"
LEGACY_FILE = "checkpoint.pt"
_FORMAT = "saealign.checkpoint"
_VERSION = 1


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``folder`` atomically (a reader sees the previous checkpoint or this one)."""
    tensors: dict[str, Tensor] = {}
    meta = {"format": _FORMAT, "version": _VERSION, "state": _encode(state, tensors)}
    text = json.dumps(meta, indent=1, allow_nan=False) + "\n"
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / META_FILE).write_text(text)


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The state saved in ``folder``; None when it holds no checkpoint (a fresh run)."""
    meta_path, tensors_path = folder / META_FILE, folder / TENSORS_FILE
    if not meta_path.exists() and not tensors_path.exists():
        if (folder / LEGACY_FILE).exists():
            raise SaealignError(
                f"{folder / LEGACY_FILE} is an old pickle checkpoint, which saealign no longer reads (loading "
                f"it could run code): delete {folder} to start the run over"
            )
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensors_path))
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{META_FILE} is not a saealign checkpoint")
        if meta.get("version") != _VERSION:
            raise ValueError(f"version {meta.get('version')!r}, this saealign reads {_VERSION}")
        state = _decode(meta["state"], tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise SaealignError(f"checkpoint in {folder} is unreadable ({e}): delete the folder to start over") from e
    if not isinstance(state, dict):
        raise SaealignError(f"checkpoint in {folder} is unreadable (not a state dict): delete the folder to start over")
    return state


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"$tensor": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__}: use tensors and plain values")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"$tensor"}:
        return tensors[value["$tensor"]]
    if set(value) == {"$tuple"}:
        return tuple(_decode(v, tensors) for v in value["$tuple"])
    if set(value) == {"$items"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["$items"]}
    return {k: _decode(v, tensors) for k, v in value.items()}

