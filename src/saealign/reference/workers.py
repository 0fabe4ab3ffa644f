"""The unit of index work, shared by every engine: load a stack from specs, turn texts into a shard file.

The single-process build (:mod:`saealign.reference.index`) and the Ray build
(:mod:`saealign.reference.ray_engine`) both call :class:`ShardMaker`, so their shards are made by the
same code and differ only in where it runs. A Ray actor on another machine cannot receive a loaded
model, so it gets a :class:`BuildSpec` (strings) and loads the model, SAE and embedder itself.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saealign.errors import SaealignError
from saealign.models import LoadedModel, load_model
from saealign.reference.embed import Embedder, HashingEmbedder, TextEmbedder
from saealign.reference.manifest import IndexConfig, shard_name
from saealign.reference.shards import ShardRecord, write_shard
from saealign.reference.statistics import compact_shard, prompt_statistics
from saealign.sae.autoencoder import SAE

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuildSpec:
    """Everything a worker needs to load its own copy of the stack (plain strings: it travels to other machines)."""

    model: str
    """A :func:`saealign.models.load_model` spec: ``default``, a folder, a ``.gguf`` file, a hub id."""
    sae: str
    """An SAE folder or file that :func:`saealign.sae.formats.load_sae` reads."""
    embedder: str = "default"
    """``default`` (all-MiniLM-L6-v2 from its wheel), ``hashing:DIM`` (tests), or a sentence-transformers folder."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``: where the model, SAE and embedder run."""
    dtype: str | None = None
    """``float32``, ``bfloat16`` or ``float16``; None: bf16 where the hardware has it (GPUs, AVX512-BF16), else fp32."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise SaealignError(f"unknown dtype {self.dtype!r}: use one of {', '.join(_DTYPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise SaealignError(f"unknown device {self.device!r}: use cpu, cuda or cuda:N")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.dtype] if self.dtype else None

    def load(self) -> tuple[LoadedModel, SAE, TextEmbedder]:
        """Load the model, SAE and embedder onto :attr:`device` (one clear error if the device is missing)."""
        from saealign.sae.formats import load_sae

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SaealignError(f"--device {self.device} needs a CUDA GPU, and torch sees none here")
        lm = load_model(self.model, dtype=self.torch_dtype)
        lm.model.to(self.device)
        sae = load_sae(self.sae, dtype=next(lm.model.parameters()).dtype).to(self.device)
        return lm, sae, load_embedder(self.embedder, self.device)


@dataclass(frozen=True)
class BuildEngine:
    """Where and how an index is built: this process, or a Ray cluster (``saealign index build --engine``)."""

    kind: str = "local"
    """``local`` (this process) or ``ray`` (a Ray Data actor pool; needs the ``ray`` extra)."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N`` for the model, SAE and embedder (each Ray actor takes one GPU)."""
    dtype: str | None = None
    """``float32``/``bfloat16``/``float16``; None: bf16 where the hardware computes it natively, else fp32."""
    ray_address: str | None = None
    """Ray cluster ``HOST:PORT`` (else ``$RAY_ADDRESS``, else a new local instance)."""
    workers: int | None = None
    """Ray actors (default: one per GPU, or one per ``cpus_per_worker`` CPUs of the cluster)."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray actor reserves (its torch threads)."""

    def __post_init__(self) -> None:
        if self.kind not in ("local", "ray"):
            raise SaealignError(f"unknown engine {self.kind!r}: use local or ray")
        if self.workers is not None and self.workers < 1 or self.cpus_per_worker <= 0:
            raise SaealignError("--workers must be >= 1 and --cpus-per-worker > 0")
        BuildSpec("m", "s", device=self.device, dtype=self.dtype)  # the same device/dtype checks


def load_embedder(spec: str, device: str = "cpu") -> TextEmbedder:
    if spec == "default":
        return Embedder.default(device=device)
    if spec.startswith("hashing:"):
        return HashingEmbedder(int(spec.split(":", 1)[1]))
    return Embedder.load(spec, device=device)


class ShardMaker:
    """Statistics, compaction and the atomic write of one shard, for a loaded model, SAE and embedder."""

    def __init__(self, lm: LoadedModel, sae: SAE, embedder: TextEmbedder, cfg: IndexConfig, store: Path) -> None:
        self.lm, self.sae, self.embedder, self.cfg, self.store = lm, sae, embedder, cfg, store

    def __call__(self, folder: Path, shard: int, texts: list[str]) -> tuple[ShardRecord, dict[str, float]]:
        """Write shard ``shard`` (holding ``texts``) under ``folder``; return its record and timings."""
        cfg = self.cfg
        t0 = time.perf_counter()
        act_sum, act_max, _, n_tokens = prompt_statistics(self.lm, self.sae, cfg.layer, texts, cfg.max_seq_len,
                                                          cfg.batch_size)
        t1 = time.perf_counter()
        emb = embedding_shard(self.store, shard, texts, self.embedder)
        t2 = time.perf_counter()
        compact, nnz = compact_shard(act_sum, act_max, n_tokens, emb)
        record = write_shard(folder, shard_name(shard), compact, shard * cfg.shard_size, nnz)
        return record, {"latents_s": t1 - t0, "embeddings_s": t2 - t1}


def embedding_shard(store: Path, shard: int, texts: list[str], embedder: TextEmbedder) -> np.ndarray:
    """Embeddings of one shard from the per-corpus store (user cache), computed and stored when missing.

    Embeddings depend on the corpus and the embedder only, so a second index over the same corpus
    (another layer, another SAE) reuses them.
    """
    path = store / f"{shard:05d}.npy"
    if path.exists():
        try:
            emb = np.load(path)
            if emb.shape[0] == len(texts) and np.isfinite(emb).all():
                return emb
        except (OSError, ValueError):
            pass  # a damaged store entry is recomputed below
    emb = embedder.embed(texts).astype(np.float16)
    store.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{shard:05d}.", suffix=".npy", dir=store)  # unique: builds may run side by side
    with os.fdopen(fd, "wb") as f:
        np.save(f, emb)
    os.replace(tmp, path)
    return emb
