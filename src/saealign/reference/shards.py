"""One reference-index shard on disk: a safetensors file, checksummed, memory-mapped when read.

A shard holds a contiguous run of the index's prompts (``n`` prompts, ``m`` bytes of codes, ``L``
latents, ``D`` embedding width)::

    packed      [m]    uint8    every (prompt, latent) entry of the normalised-sum summary, 12 bits each (codec)
    code_ptr    [n+1]  int64    where each prompt's codes start (in codes, not bytes)
    lo, step    [n]    float32  each prompt's log2 value range: w = 2 ** (lo + level * step)
    totals      [n]    float32  each prompt's summed activation over all its latents (sum = w * total)
    n_tokens    [n]    int32    content tokens counted (mean = sum / n_tokens)
    embeddings  [n, D] int8     sentence embeddings, scaled per row to use the int8 range
    inv_norms   [n]    float32  1 / |row| of the int8 embeddings, so cos = (q . t) * inv_norm
    latent_*    [L]             exact per-latent statistics of the shard (prompts fired on, max, total)

Every array is used where it lies on disk (``np.frombuffer`` over an ``mmap``): an index of any size
is opened without being read into memory. The manifest records each shard's size and SHA-256;
:func:`open_shard` verifies both and walks every code once to check that each latent id is in range
before any kernel reads them (an out-of-range id would write outside the scorer's arrays).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from saealign.cache import atomic_write_bytes
from saealign.errors import SaealignError
from saealign.reference.codec import check_codes

_DTYPES = {"U8": np.uint8, "I8": np.int8, "I32": np.int32, "I64": np.int64, "F32": np.float32, "F64": np.float64}
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Shard:
    """The arrays of one shard (see the module docstring for shapes and meaning)."""

    packed: np.ndarray
    code_ptr: np.ndarray
    lo: np.ndarray
    step: np.ndarray
    totals: np.ndarray
    n_tokens: np.ndarray
    embeddings: np.ndarray
    inv_norms: np.ndarray
    latent_prompts: np.ndarray
    """``[L]`` int32: prompts of the shard each latent fires on."""
    latent_max: np.ndarray
    """``[L]`` float32: largest token activation of each latent over the shard."""
    latent_total: np.ndarray
    """``[L]`` float32: summed activation of each latent over the shard."""

    @property
    def n_prompts(self) -> int:
        return int(self.code_ptr.shape[0] - 1)


_EXPECTED = {"packed": np.uint8, "code_ptr": np.int64, "lo": np.float32, "step": np.float32, "totals": np.float32,
             "n_tokens": np.int32, "embeddings": np.int8, "inv_norms": np.float32, "latent_prompts": np.int32,
             "latent_max": np.float32, "latent_total": np.float32}


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest says about one shard: enough to find it and to verify it before use."""

    file: str
    """Path relative to the index folder."""
    first: int
    """Index of the shard's first prompt in the whole index."""
    count: int
    """Prompts in the shard."""
    nnz: int
    """(prompt, latent) entries."""
    bytes: int
    """File size."""
    sha256: str
    """Hex SHA-256 of the file."""

    @classmethod
    def from_json(cls, obj: Any) -> ShardRecord:
        try:
            return cls(**{f.name: obj[f.name] for f in fields(cls)})
        except (TypeError, KeyError) as e:
            raise SaealignError(f"a shard entry of the manifest is malformed ({e!r}): rebuild the index") from None


def write_shard(folder: Path, name: str, shard: Shard, first: int, nnz: int) -> ShardRecord:
    """Write ``shard`` (``nnz`` entries) to ``folder/name`` atomically (unique temporary name, then rename)."""
    arrays = {f.name: np.ascontiguousarray(getattr(shard, f.name), dtype=_EXPECTED[f.name]) for f in fields(Shard)}
    data = save(arrays, metadata={"format": "saealign-index-shard"})
    path = folder / name
    atomic_write_bytes(path, data)
    return ShardRecord(file=name, first=first, count=shard.n_prompts, nnz=nnz, bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def record_matches(folder: Path, record: ShardRecord) -> bool:
    """True when the shard file exists with the recorded size and checksum (used to decide what to rebuild)."""
    path = folder / record.file
    try:
        return path.stat().st_size == record.bytes and file_sha256(path) == record.sha256
    except OSError:
        return False


def open_shard(folder: Path, record: ShardRecord, d_sae: int, dim: int) -> Shard:
    """Verify and memory-map one shard; any defect is one line naming the shard and saying to rebuild."""
    path = folder / record.file

    def corrupt(why: str) -> SaealignError:
        return SaealignError(f"index shard {path} is corrupt ({why}): rebuild it with `saealign index build`")

    try:
        size = path.stat().st_size
        if size != record.bytes:
            raise corrupt(f"{size} bytes, the manifest says {record.bytes}")
        if file_sha256(path) != record.sha256:
            raise corrupt("checksum mismatch")
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise corrupt(f"{type(e).__name__}: {e.strerror or e}") from None
    arrays = _views(buffer, corrupt)
    shard = Shard(**arrays)
    _check_bounds(shard, record, d_sae, dim, corrupt)
    return shard


def _views(buffer: mmap.mmap, corrupt: Any) -> dict[str, np.ndarray]:
    """Read-only numpy views of the tensors of a safetensors file, without copying."""
    try:
        (header_len,) = struct.unpack("<Q", buffer[:8])
        header = json.loads(bytes(buffer[8 : 8 + header_len]))
    except (struct.error, ValueError) as e:
        raise corrupt(f"unreadable header: {e}") from None
    base = 8 + header_len
    out: dict[str, np.ndarray] = {}
    for name, want in _EXPECTED.items():
        info = header.get(name)
        if not isinstance(info, dict) or _DTYPES.get(str(info.get("dtype"))) is not want:
            raise corrupt(f"tensor {name} missing or of the wrong type")
        start, stop = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if stop - start != count * np.dtype(want).itemsize or base + stop > len(buffer):
            raise corrupt(f"tensor {name} does not fit the file")
        out[name] = np.frombuffer(buffer, dtype=want, count=count, offset=base + start).reshape(shape)
    return out


def _check_bounds(s: Shard, record: ShardRecord, d_sae: int, dim: int, corrupt: Any) -> None:
    """Every structural fact the kernels rely on; values must be finite (and non-negative where they are sizes)."""
    n = record.count
    if s.code_ptr.shape != (n + 1,) or s.code_ptr[0] != 0 or (n and np.any(np.diff(s.code_ptr) < 0)):
        raise corrupt("code pointers out of order")
    if (int(s.code_ptr[-1]) + 1) // 2 * 3 != s.packed.shape[0]:
        raise corrupt("codes do not fill the packed bytes")
    for name in ("lo", "step", "totals", "n_tokens", "inv_norms"):
        if getattr(s, name).shape != (n,):
            raise corrupt(f"{name} does not hold {n} prompts")
    if s.embeddings.shape != (n, dim):
        raise corrupt(f"embeddings are {s.embeddings.shape}, expected ({n}, {dim})")
    for name in ("latent_prompts", "latent_max", "latent_total"):
        if getattr(s, name).shape != (d_sae,):
            raise corrupt(f"{name} does not hold {d_sae} latents")
    for name in ("lo", "step", "totals", "inv_norms", "latent_max", "latent_total"):
        values = getattr(s, name)
        if values.size and not np.isfinite(values).all():
            raise corrupt(f"{name} holds NaN or inf")
    if n and (s.step.min() < 0 or s.totals.min() < 0 or s.n_tokens.min() < 0 or s.inv_norms.min() <= 0):
        raise corrupt("a prompt's value range, total, token count or embedding norm is out of range")
    if s.latent_prompts.min(initial=0) < 0 or s.latent_prompts.max(initial=0) > n:
        raise corrupt("latent prompt counts out of range")
    counts, bad = check_codes(s.packed, s.code_ptr, d_sae)
    if bad >= 0:
        raise corrupt(f"prompt {record.first + bad} has a latent index outside [0, {d_sae})")
    if int(counts.sum()) != record.nnz:
        raise corrupt(f"{int(counts.sum())} entries, the manifest says {record.nnz}")
