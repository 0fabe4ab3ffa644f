"""The ReferenceIndex: everything M1 needs about P_ref, computed once so a topic never runs the LLM.

Per prompt: the sparse SAE statistics over its content tokens (sum, max and count of each latent's
activation, one CSR pattern), its token count, its sentence embedding (fp16), text and label.
Per latent (derived at load): prompts fired on, max and total activation.

On disk the index is a plain folder, built in shards so a killed build resumes where it stopped
and yields the same result::

    manifest.json             config, keys (model, SAE, corpus, embedder), shard list
    texts.jsonl               one {"text", "label"} a prompt, in index order
    shards/NNNNN.npz          CSR statistics of the shard's prompts + n_tokens
    shards/NNNNN.emb.npy      the shard's embeddings (fp16)

Embeddings do not depend on the model or SAE, so they are also kept in a per-corpus store in the
user cache: a second index over the same corpus (another layer, another SAE) reuses them.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from saealign.cache import atomic_write_bytes, atomic_write_json, cache_dir, hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel, content_mask, layer_module, residuals_at, special_token_ids
from saealign.reference.corpus import Corpus
from saealign.reference.embed import TextEmbedder, min_distances
from saealign.reference.scoring import (
    METRICS,
    SUMMARIES,
    PreparedSummary,
    TopicScores,
    prepare_summary,
    score_topic,
    summary_matrix,
)
from saealign.sae.autoencoder import SAE, sae_key

FORMAT = "saealign-reference-index"
VERSION = 1


@dataclass(frozen=True)
class IndexConfig:
    """How prompts are turned into index rows."""

    layer: int
    """Block whose output the SAE reads."""
    max_seq_len: int = 128
    """Prompts are truncated to this many tokens."""
    batch_size: int = 32
    """Prompts per forward pass (sorted by length within a shard to avoid padding)."""
    shard_size: int = 2048
    """Prompts per shard: the unit of resumption and of bounded memory."""

    def __post_init__(self) -> None:
        if self.max_seq_len < 2 or self.batch_size < 1 or self.shard_size < 1:
            raise SaealignError("index config needs max_seq_len >= 2, batch_size >= 1, shard_size >= 1")


@dataclass(frozen=True)
class IndexKeys:
    """What an index was built from; loading checks these against what the caller has."""

    model: str
    sae: str
    layer: int
    corpus: str
    embedder: str


# -- building ---------------------------------------------------------------------------------
@torch.inference_mode()
def shard_statistics(
    lm: LoadedModel, sae: SAE, cfg: IndexConfig, texts: list[str]
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """SAE statistics of ``texts``: ``(pattern CSR [n, L] of act_sum, act_max data, act_count data, n_tokens [n])``.

    Content tokens only (first position and special tokens left out, as in SAE training).
    """
    tok = lm.tokenizer
    special = special_token_ids(tok)
    enc = [tok(t, truncation=True, max_length=cfg.max_seq_len)["input_ids"] for t in texts]  # type: ignore[operator]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    d_sae = sae.d_sae
    # Statistics are gathered sparsely, as (prompt, latent, value) triples of the active latents: dense
    # [prompts, d_sae] accumulators with index_add/scatter_reduce made the build 2.4x slower than the raw
    # forward + embeddings (bench_index).
    keys: list[np.ndarray] = []
    values: list[np.ndarray] = []
    n_tokens = np.zeros(len(texts), dtype=np.int32)
    for b in range(0, len(order), cfg.batch_size):
        rows = order[b : b + cfg.batch_size]
        width = max(len(enc[r]) for r in rows)
        ids = torch.full((len(rows), width), int(tok.pad_token_id))  # type: ignore[attr-defined]
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(enc[r])] = torch.tensor(enc[r])
            mask[j, : len(enc[r])] = 1
        keep = content_mask(ids, mask, special)
        x = residuals_at(lm.model, cfg.layer, ids, mask)[keep]
        acts = sae.encode(x).float()
        token, latent = acts.nonzero(as_tuple=True)
        owner = torch.tensor(rows)[keep.nonzero()[:, 0]]
        keys.append((owner[token].long() * d_sae + latent).numpy())
        values.append(acts[token, latent].numpy())
        n_tokens[rows] = keep.sum(dim=1).numpy()
    return _combine(np.concatenate(keys) if keys else np.zeros(0, np.int64),
                    np.concatenate(values) if values else np.zeros(0, np.float32), len(texts), d_sae) + (n_tokens,)


def _combine(keys: np.ndarray, values: np.ndarray, n: int, d_sae: int
             ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Per (prompt, latent) sum, max and count of token activations, from ``prompt * d_sae + latent`` keys.

    Returns ``(CSR [n, d_sae] of sums (sorted indices), max data, count data)``, data aligned with the CSR.
    """
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order].astype(np.float32)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    unique = keys[starts]
    sums = np.add.reduceat(values, starts) if len(keys) else np.zeros(0, np.float32)
    maxes = np.maximum.reduceat(values, starts) if len(keys) else np.zeros(0, np.float32)
    counts = np.add.reduceat((values > 0).astype(np.float32), starts) if len(keys) else np.zeros(0, np.float32)
    live = sums != 0  # a dense matrix would not store an exact zero sum either
    unique, sums, maxes, counts = unique[live], sums[live], np.maximum(maxes[live], 0), counts[live]
    rows, cols = unique // d_sae, unique % d_sae
    indptr = np.searchsorted(rows, np.arange(n + 1)).astype(np.int64)
    pattern = sp.csr_matrix((sums.astype(np.float32), cols.astype(np.int32), indptr), shape=(n, d_sae))
    return pattern, maxes.astype(np.float32), counts.astype(np.float32)


def _embedding_shard(store: Path, shard: int, texts: list[str], embedder: TextEmbedder) -> np.ndarray:
    """Embeddings of one shard from the per-corpus store, computed and stored when missing."""
    path = store / f"{shard:05d}.npy"
    if path.exists():
        try:
            emb = np.load(path)
            if emb.shape[0] == len(texts):
                return emb
        except (OSError, ValueError):
            pass  # a damaged store entry is recomputed below
    emb = embedder.embed(texts).astype(np.float16)
    store.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb


def build_index(
    lm: LoadedModel,
    sae: SAE,
    corpus: Corpus,
    embedder: TextEmbedder,
    folder: Path,
    cfg: IndexConfig,
    progress: bool = True,
) -> ReferenceIndex:
    """Build (or resume building) the index of ``corpus`` at ``folder`` and load it.

    A folder holding a finished index with the same keys is loaded as is; a partial one with the
    same keys continues from its first missing shard; one with other keys is an error (never
    silently overwritten).
    """
    from saealign.sae.formats import check_sae_fits

    check_sae_fits(sae, lm.d_model, f"layer {cfg.layer}")
    layer_module(lm.model, cfg.layer)  # range check before anything is written
    if len(corpus) == 0:
        raise SaealignError("the reference corpus is empty: give texts to index")
    keys = IndexKeys(model=lm.key, sae=sae_key(sae), layer=cfg.layer, corpus=corpus.fingerprint(),
                     embedder=getattr(embedder, "fingerprint", type(embedder).__name__))
    manifest_path = folder / "manifest.json"
    n_shards = -(-len(corpus) // cfg.shard_size)
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "config": asdict(cfg), "keys": asdict(keys),
        "n_prompts": len(corpus), "n_shards": n_shards, "d_sae": sae.d_sae, "complete": False,
        "corpus_name": corpus.name, "timings": {},
    }
    if manifest_path.exists():
        old = _read_manifest(folder)
        if old.get("keys") != manifest["keys"] or old.get("config") != manifest["config"]:
            raise SaealignError(
                f"{folder} holds an index built from other inputs ({_diff(old, manifest)}): "
                "choose another folder or delete it to rebuild"
            )
        if old.get("complete"):
            return ReferenceIndex.load(folder)
        manifest["timings"] = old.get("timings", {})
    else:
        folder.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({"text": t, "label": lab}) for t, lab in zip(corpus.texts, corpus.labels, strict=True))
        atomic_write_bytes(folder / "texts.jsonl", ("\n".join(lines) + "\n").encode())
        atomic_write_json(manifest_path, manifest)
    (folder / "shards").mkdir(exist_ok=True)
    store = cache_dir("embeddings", hash_json([keys.corpus, keys.embedder, cfg.shard_size]))
    with tqdm(total=len(corpus), desc=f"index L{cfg.layer}", unit="prompt", disable=not progress) as bar:
        _build_shards(lm, sae, corpus, embedder, folder, cfg, manifest, store, bar)
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return ReferenceIndex.load(folder)


def _build_shards(lm: LoadedModel, sae: SAE, corpus: Corpus, embedder: TextEmbedder, folder: Path, cfg: IndexConfig,
                  manifest: dict[str, Any], store: Path, bar: tqdm) -> None:
    """Compute every missing shard; each is written atomically, the manifest updated after each."""
    timings = manifest["timings"]
    for shard in range(manifest["n_shards"]):
        lo, hi = shard * cfg.shard_size, min(len(corpus), (shard + 1) * cfg.shard_size)
        stats_path = folder / "shards" / f"{shard:05d}.npz"
        emb_path = folder / "shards" / f"{shard:05d}.emb.npy"
        if stats_path.exists() and emb_path.exists():
            bar.update(hi - lo)
            continue
        texts = corpus.texts[lo:hi]
        t0 = time.perf_counter()
        pattern, act_max, act_count, n_tokens = shard_statistics(lm, sae, cfg, texts)
        t1 = time.perf_counter()
        emb = _embedding_shard(store, shard, texts, embedder)
        t2 = time.perf_counter()
        timings["latents_s"] = timings.get("latents_s", 0.0) + (t1 - t0)
        timings["embeddings_s"] = timings.get("embeddings_s", 0.0) + (t2 - t1)
        tmp_emb = emb_path.with_suffix(".tmp.npy")
        np.save(tmp_emb, emb)
        tmp_emb.replace(emb_path)
        tmp = stats_path.with_suffix(".tmp.npz")
        np.savez(tmp, indptr=pattern.indptr, indices=pattern.indices, act_sum=pattern.data,
                 act_max=act_max, act_count=act_count, n_tokens=n_tokens)
        tmp.replace(stats_path)  # the stats file last: its presence marks the shard done
        manifest["timings"] = timings
        atomic_write_json(folder / "manifest.json", manifest)
        bar.update(hi - lo)


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise SaealignError(f"no index at {folder}: build one with `saealign index build`") from None
    except (OSError, ValueError) as e:
        raise SaealignError(f"index at {folder} is corrupt (manifest unreadable: {e}): delete it and rebuild") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise SaealignError(f"{folder} is not a saealign index of version {VERSION}: rebuild it")
    return manifest


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = [f"{k} {old['keys'].get(k)} != {v}" for k, v in new["keys"].items() if old.get("keys", {}).get(k) != v]
    parts += [f"{k} {old['config'].get(k)} != {v}" for k, v in new["config"].items()
              if k not in new["keys"] and old.get("config", {}).get(k) != v]
    return ", ".join(parts) or "different settings"


# -- loading and scoring -----------------------------------------------------------------------
class ReferenceIndex:
    """A loaded reference index: score topics against it, explain latents with its texts."""

    def __init__(self, folder: Path, manifest: dict[str, Any], act_sum: sp.csr_matrix, act_max: np.ndarray,
                 act_count: np.ndarray, n_tokens: np.ndarray, embeddings: np.ndarray,
                 texts: list[str], labels: list[str]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.keys = IndexKeys(**manifest["keys"])
        self.config = IndexConfig(**manifest["config"])
        self.act_sum = act_sum
        self._act_max = act_max
        self._act_count = act_count
        self.n_tokens = n_tokens
        self.embeddings = embeddings.astype(np.float32)
        norms = np.linalg.norm(self.embeddings, axis=1, keepdims=True)
        self.embeddings /= np.where(norms > 0, norms, 1)  # fp16 storage rounds the unit norm
        self.texts = texts
        self.labels = labels
        self._prepared: dict[str, PreparedSummary] = {}
        self._by_latent: sp.csc_matrix | None = None
        d_sae = act_sum.shape[1]
        as_max = sp.csr_matrix((act_max, act_sum.indices, act_sum.indptr), shape=act_sum.shape)
        self.latent_max_act = np.asarray(as_max.max(axis=0).todense()).ravel().astype(np.float32)
        self.latent_total_act = np.asarray(act_sum.sum(axis=0)).ravel().astype(np.float64)
        self.latent_n_prompts = np.bincount(act_sum.indices, minlength=d_sae).astype(np.int64)

    @property
    def n_prompts(self) -> int:
        return int(self.act_sum.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.act_sum.shape[1])

    @property
    def key(self) -> str:
        return hash_json(self.manifest["keys"])

    @classmethod
    def load(cls, folder: str | Path, model_key: str | None = None, sae_key: str | None = None,
             layer: int | None = None) -> ReferenceIndex:
        """Load the index at ``folder``; with keys given, refuse an index built for something else."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        keys = manifest["keys"]
        for what, want, have in (("model", model_key, keys["model"]), ("SAE", sae_key, keys["sae"]),
                                 ("layer", layer, keys["layer"])):
            if want is not None and want != have:
                raise SaealignError(
                    f"index at {folder} was built for {what} {have}, not {want}: rebuild it with `saealign index build`"
                )
        if not manifest.get("complete"):
            raise SaealignError(f"index at {folder} is incomplete: rerun `saealign index build` to resume it")
        try:
            parts = [np.load(folder / "shards" / f"{s:05d}.npz") for s in range(manifest["n_shards"])]
            emb = np.concatenate([np.load(folder / "shards" / f"{s:05d}.emb.npy") for s in range(manifest["n_shards"])])
            rows = [json.loads(line) for line in (folder / "texts.jsonl").read_text().splitlines() if line]
            d_sae = int(manifest["d_sae"])
            mats = [sp.csr_matrix((p["act_sum"], p["indices"], p["indptr"]),
                                  shape=(len(p["indptr"]) - 1, d_sae)) for p in parts]
            act_sum = sp.vstack(mats, format="csr")
            act_max = np.concatenate([p["act_max"] for p in parts])
            act_count = np.concatenate([p["act_count"] for p in parts])
            n_tokens = np.concatenate([p["n_tokens"] for p in parts])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise SaealignError(f"index at {folder} is corrupt ({type(e).__name__}: {e}): delete it and rebuild") from None
        n = manifest["n_prompts"]
        if not (act_sum.shape[0] == emb.shape[0] == len(rows) == n):
            raise SaealignError(
                f"index at {folder} is corrupt (shards hold {act_sum.shape[0]} prompts, embeddings {emb.shape[0]}, "
                f"texts {len(rows)}, manifest {n}): delete it and rebuild"
            )
        return cls(folder, manifest, act_sum, act_max, act_count, n_tokens, emb,
                   [r["text"] for r in rows], [r["label"] for r in rows])

    def prepared(self, summary: str = "normalized_sum") -> PreparedSummary:
        """The summary matrix of kind ``summary`` with its per-latent sums, computed once per kind."""
        if summary not in SUMMARIES:
            raise SaealignError(f"unknown summary {summary!r}: use one of {', '.join(SUMMARIES)}")
        if summary not in self._prepared:
            self._prepared[summary] = prepare_summary(
                summary_matrix(self.act_sum, self._as_matrix(self._act_max), self._as_matrix(self._act_count),
                               self.n_tokens, summary)
            )
        return self._prepared[summary]

    def _as_matrix(self, data: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((data, self.act_sum.indices, self.act_sum.indptr), shape=self.act_sum.shape)

    def distances(self, topic_embeddings: np.ndarray, metric: str = "euclidean") -> np.ndarray:
        """``d(p)`` for every prompt: min distance to the topic embeddings ``[M, D]``."""
        if metric not in METRICS:
            raise SaealignError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
        return min_distances(self.embeddings, topic_embeddings, metric)  # type: ignore[arg-type]

    def score(self, texts: list[str], embedder: TextEmbedder, summary: str = "normalized_sum",
              metric: str = "euclidean", min_prompts: int = 20) -> TopicScores:
        """M1: score every latent against the topic ``texts`` (sparse arithmetic only; no LLM)."""
        texts = [t.strip() for t in texts if t and t.strip()]
        if not texts:
            raise SaealignError("the topic has no texts: give at least one non-empty example text")
        fingerprint = getattr(embedder, "fingerprint", type(embedder).__name__)
        if fingerprint != self.keys.embedder:
            raise SaealignError(
                f"this index was embedded with {self.keys.embedder}, not {fingerprint}: distances between "
                "different embedders mean nothing -- score with the index's embedder or rebuild the index"
            )
        emb = embedder.embed(texts)
        return score_topic(self.prepared(summary), self.distances(emb, metric), min_prompts,
                           topic_texts=texts, summary_kind=summary, metric=metric,
                           index_key=self.key, sae_key=self.keys.sae)

    def top_texts(self, latent: int, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` reference texts where ``latent`` has its largest summed activation."""
        if self._by_latent is None:
            self._by_latent = self.act_sum.tocsc()  # column access; built once, on first use
        col = self._by_latent
        lo, hi = col.indptr[latent], col.indptr[latent + 1]
        vals, rows = col.data[lo:hi], col.indices[lo:hi]
        order = np.argsort(-vals, kind="stable")[:n]
        return [(self.texts[int(rows[i])], float(vals[i])) for i in order]
