"""The ReferenceIndex: everything M1 needs about P_ref, computed once so a topic never runs the LLM.

On disk an index is a plain folder, built in shards so a killed build resumes where it stopped and
yields the same bytes, and so shards can be made on many machines (:mod:`ray_engine`)::

    manifest.json             config, keys (model, SAE, layer, corpus, embedder), each file's size + SHA-256
    texts.jsonl.gz            one {"text", "label"} a prompt, in index order
    shards/NNNNN.safetensors  the shard's compact summaries, embeddings, exact per-latent statistics

Loading verifies every checksum and bound, then memory-maps the shards (:mod:`shards`): nothing is
copied, so an index of a million prompts opens in bounded memory (~0.9 KB a prompt for the default
SAE, against 5.7 KB for the float arrays of version 1). What is approximated, and by how much, is
measured in docs/scaling.md: summary values to ±3 % (the sparsity pattern is exact) and embeddings
as int8. The per-latent facts (prompts fired on, max and total activation) are exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from saealign.cache import atomic_write_bytes, cache_dir, hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.codec import column, decode
from saealign.reference.corpus import Corpus
from saealign.reference.embed import TextEmbedder
from saealign.reference.manifest import (
    FORMAT,
    TEXTS_FILE,
    VERSION,
    IndexConfig,
    IndexKeys,
    check_keys,
    differences,
    new_manifest,
    read_manifest,
    shard_records,
    write_manifest,
)
from saealign.reference.scoring import METRICS, SUMMARIES, PreparedSummary, TopicScores, score_topic
from saealign.reference.sharded import CODED_KINDS, CodedColumns, distances_from_cosines, max_cosines
from saealign.reference.shards import Shard, ShardRecord, file_sha256, open_shard, record_matches
from saealign.reference.statistics import compact_shard
from saealign.reference.texts import TextStore, texts_bytes
from saealign.reference.workers import ShardMaker
from saealign.residual_stream import layer_module
from saealign.sae.autoencoder import SAE, sae_key

__all__ = ["FORMAT", "VERSION", "IndexConfig", "IndexKeys", "ReferenceIndex", "build_index", "prepare_folder",
           "missing_shards", "finish", "cache_folder"]


# -- building ---------------------------------------------------------------------------------
def stack_keys(lm: LoadedModel, sae: SAE, layer: int, corpus: Corpus, embedder: TextEmbedder) -> IndexKeys:
    return IndexKeys(model=lm.key, sae=sae_key(sae), layer=layer, corpus=corpus.fingerprint(),
                     embedder=getattr(embedder, "fingerprint", type(embedder).__name__))


def build_index(
    lm: LoadedModel,
    sae: SAE,
    corpus: Corpus,
    embedder: TextEmbedder,
    folder: Path,
    cfg: IndexConfig,
    progress: bool = True,
) -> ReferenceIndex:
    """Build (or resume building) the index of ``corpus`` at ``folder`` in this process, and load it.

    A folder holding a finished index with the same keys is loaded as is; a partial one with the same
    keys continues with the shards it lacks (a shard whose file does not match its checksum is one it
    lacks); one with other keys is an error (never silently overwritten).
    """
    from saealign.sae.formats import check_sae_fits

    check_sae_fits(sae, lm.d_model, f"layer {cfg.layer}")
    layer_module(lm.model, cfg.layer)  # range check before anything is written
    keys = stack_keys(lm, sae, cfg.layer, corpus, embedder)
    manifest = prepare_folder(folder, corpus, cfg, keys, sae.d_sae, int(embedder.dim))
    todo = missing_shards(folder, manifest)
    maker = ShardMaker(lm, sae, embedder, cfg, embedding_store(keys, cfg))
    done = len(corpus) - sum(min(cfg.shard_size, len(corpus) - s * cfg.shard_size) for s in todo)
    with tqdm(total=len(corpus), initial=done, desc=f"index L{cfg.layer}", unit="prompt", disable=not progress) as bar:
        for shard in todo:
            texts = corpus.texts[shard * cfg.shard_size : (shard + 1) * cfg.shard_size]
            record, timings = maker(folder, shard, texts)
            add_record(folder, manifest, shard, record, timings)
            bar.update(len(texts))
    return finish(folder, manifest)


def cache_folder(keys: IndexKeys) -> Path:
    """Where the index of ``keys`` lives in the user cache (``v2``: this format; an old folder is left alone)."""
    return cache_dir("index", f"L{keys.layer}-{keys.model[:8]}-{keys.sae[:8]}-{keys.corpus[:8]}-v{VERSION}")


def embedding_store(keys: IndexKeys, cfg: IndexConfig) -> Path:
    return cache_dir("embeddings", hash_json([keys.corpus, keys.embedder, cfg.shard_size]))


def prepare_folder(folder: Path, corpus: Corpus, cfg: IndexConfig, keys: IndexKeys, d_sae: int, dim: int
                   ) -> dict[str, Any]:
    """The manifest to build into: the folder's own (same inputs) or a new one with the texts written."""
    if len(corpus) == 0:
        raise SaealignError("the reference corpus is empty: give texts to index")
    manifest = new_manifest(cfg, keys, len(corpus), d_sae, dim, corpus.name)
    if (folder / "manifest.json").exists():
        old = read_manifest(folder)
        diff = differences(old, manifest)
        if diff:
            raise SaealignError(f"{folder} holds an index built from other inputs ({', '.join(diff)}): "
                                "choose another folder or delete it to rebuild")
        return old
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SaealignError(f"{folder} exists and holds no saealign index: choose a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    data = texts_bytes(corpus.texts, corpus.labels)
    atomic_write_bytes(folder / TEXTS_FILE, data)
    manifest["files"][TEXTS_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(folder, manifest)
    return manifest


def missing_shards(folder: Path, manifest: dict[str, Any]) -> list[int]:
    """Shards to (re)compute: unlisted, or listed with a file that is absent or fails its checksum."""
    records = shard_records(manifest)
    bad = [s for s, r in records.items() if not record_matches(folder, r)]
    for s in bad:  # a damaged or half-replaced file is rebuilt, never trusted
        del manifest["shards"][str(s)]
    if bad and manifest.get("complete"):
        manifest["complete"] = False
        write_manifest(folder, manifest)
    return [s for s in range(manifest["n_shards"]) if str(s) not in manifest["shards"]]


def add_record(folder: Path, manifest: dict[str, Any], shard: int, record: ShardRecord,
               timings: dict[str, float]) -> None:
    """Note a finished shard (and its timings) in the manifest, atomically: from now on it counts."""
    manifest["shards"][str(shard)] = asdict(record)
    for k, v in timings.items():
        manifest["timings"][k] = manifest["timings"].get(k, 0.0) + v
    write_manifest(folder, manifest)


def finish(folder: Path, manifest: dict[str, Any]) -> ReferenceIndex:
    """Mark a build complete once every shard is listed, and load (thereby verify) the result."""
    left = [s for s in range(manifest["n_shards"]) if str(s) not in manifest["shards"]]
    if left:
        raise SaealignError(f"index at {folder} still lacks shards {left[:5]}: rerun the build to resume it")
    if not manifest.get("complete"):
        manifest["complete"] = True
        write_manifest(folder, manifest)
    return ReferenceIndex.load(folder)


# -- loading and scoring -----------------------------------------------------------------------
class ReferenceIndex:
    """A loaded reference index: score topics against it, explain latents with its texts."""

    def __init__(self, folder: Path, manifest: dict[str, Any], shards: list[Shard],
                 texts: TextStore | None = None) -> None:
        self.folder = folder
        self.manifest = manifest
        self.keys = IndexKeys(**manifest["keys"])
        self.config = IndexConfig(**manifest["config"])
        self.shards = shards
        self._texts = texts
        self._prepared: dict[str, PreparedSummary] = {}
        self._act_sum: sp.csr_matrix | None = None
        self.d_sae = int(manifest["d_sae"])
        self.n_tokens = np.concatenate([s.n_tokens for s in shards]) if shards else np.zeros(0, np.int32)
        self.latent_n_prompts = np.asarray(np.sum([s.latent_prompts for s in shards], axis=0), dtype=np.int64)
        self.latent_max_act = np.max([s.latent_max for s in shards], axis=0).astype(np.float32)
        self.latent_total_act = np.sum([s.latent_total for s in shards], axis=0, dtype=np.float64)

    @property
    def summaries(self) -> tuple[str, ...]:
        """Summary kinds this index computes (a compact index keeps no per-token maxima: no ``max``)."""
        return CODED_KINDS

    @property
    def n_prompts(self) -> int:
        return int(self.n_tokens.shape[0])

    @property
    def mean_activation(self) -> np.ndarray:
        """``[d_sae]`` float64: each latent's total activation over the corpus per content token (exact)."""
        return np.asarray(self.latent_total_act / max(1, int(self.n_tokens.sum(dtype=np.int64))), dtype=np.float64)

    @property
    def key(self) -> str:
        return hash_json(self.manifest["keys"])

    @classmethod
    def load(cls, folder: str | Path, model_key: str | None = None, sae_key: str | None = None,
             layer: int | None = None, corpus_key: str | None = None, embedder_key: str | None = None
             ) -> ReferenceIndex:
        """Verify and open the index at ``folder``; with keys given, refuse (naming the part) one built for else."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        keys = IndexKeys(**manifest["keys"])
        check_keys(folder, keys, model=model_key, sae=sae_key, layer=layer, corpus=corpus_key, embedder=embedder_key)
        if not manifest.get("complete"):
            raise SaealignError(f"index at {folder} is incomplete: rerun `saealign index build` to resume it")
        texts = manifest["files"].get(TEXTS_FILE, {})
        path = folder / TEXTS_FILE
        if not path.is_file() or path.stat().st_size != texts.get("bytes") or file_sha256(path) != texts.get("sha256"):
            raise SaealignError(f"index texts {path} are missing or corrupt (checksum mismatch): "
                                "rebuild it with `saealign index build`")
        records = shard_records(manifest)
        if sorted(records) != list(range(manifest["n_shards"])):
            raise SaealignError(f"index at {folder} is corrupt (the manifest lists shards {sorted(records)[:5]}..., "
                                f"not 0..{manifest['n_shards'] - 1}): rebuild it with `saealign index build`")
        shards = [open_shard(folder, records[s], int(manifest["d_sae"]), int(manifest["dim"]))
                  for s in range(manifest["n_shards"])]
        firsts = [records[s].first for s in range(len(shards))]
        if firsts != list(np.cumsum([0] + [s.n_prompts for s in shards[:-1]])) or \
                sum(s.n_prompts for s in shards) != manifest["n_prompts"]:
            raise SaealignError(f"index at {folder} is corrupt (shards do not add up to its "
                                f"{manifest['n_prompts']} prompts): rebuild it with `saealign index build`")
        return cls(folder, manifest, shards)

    @classmethod
    def from_statistics(cls, act_sum: sp.csr_matrix, act_max: np.ndarray, n_tokens: np.ndarray,
                        embeddings: np.ndarray, texts: list[str], labels: list[str], keys: IndexKeys,
                        folder: Path = Path("in-memory")) -> ReferenceIndex:
        """An in-memory index of hand-made statistics (compacted as a build would): for tests and benchmarks."""
        act_sum = sp.csr_matrix(act_sum, dtype=np.float32)
        manifest = new_manifest(IndexConfig(layer=keys.layer), keys, act_sum.shape[0], act_sum.shape[1],
                                embeddings.shape[1], "in-memory")
        shard, _ = compact_shard(act_sum, np.asarray(act_max, dtype=np.float32), n_tokens, embeddings)
        return cls(folder, manifest | {"complete": True}, [shard], TextStore(list(texts), list(labels)))

    # -- what the rest of saealign reads --------------------------------------------------------
    @property
    def texts(self) -> list[str]:
        """Every prompt's text, in index order (a new list each call: prefer :meth:`text` for a few)."""
        return self._text_store().texts()

    @property
    def labels(self) -> list[str]:
        """Every prompt's label, in index order (a new list each call)."""
        return self._text_store().labels()

    def text(self, i: int) -> str:
        """Prompt ``i``'s text."""
        return self._text_store().text(i)

    def _text_store(self) -> TextStore:
        if self._texts is None:  # read on first use: a million texts are not needed to score
            self._texts = TextStore.read(self.folder / TEXTS_FILE)
        return self._texts

    @property
    def act_sum(self) -> sp.csr_matrix:
        """``[P, L]`` summed activation of each (prompt, latent) entry, decoded once into memory (small indexes)."""
        if self._act_sum is None:
            parts = []
            for s in self.shards:
                indptr, indices, values = decode(s.packed, s.code_ptr, s.lo, s.step, int(s.latent_prompts.sum()))
                sums = values * np.repeat(s.totals, np.diff(indptr))
                parts.append(sp.csr_matrix((sums, indices, indptr), shape=(s.n_prompts, self.d_sae)))
            self._act_sum = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.d_sae))
        return self._act_sum

    @property
    def embeddings(self) -> np.ndarray:
        """``[P, D]`` float32 unit rows, decoded from the int8 store (a copy: for inspection, not scoring)."""
        return np.concatenate([s.embeddings.astype(np.float32) * s.inv_norms[:, None] for s in self.shards])

    def prepared(self, summary: str = "normalized_sum") -> PreparedSummary:
        """The summary of kind ``summary`` as M1's operator over the coded shards (weights computed once per kind).

        ``n_prompts`` is the exact per-latent count each shard stores.
        """
        if summary not in SUMMARIES:
            raise SaealignError(f"unknown summary {summary!r}: use one of {', '.join(SUMMARIES)}")
        if summary not in self._prepared:
            columns = CodedColumns(self.shards, self.d_sae, summary)
            weight = columns @ np.ones(self.n_prompts)
            self._prepared[summary] = PreparedSummary(transposed=columns, weight=weight, n_prompts=self.latent_n_prompts)
        return self._prepared[summary]

    def distances(self, topic_embeddings: np.ndarray, metric: str = "euclidean") -> np.ndarray:
        """``d(p)`` ``[P]`` float64 for every prompt: distance to the nearest of the unit topic rows ``[M, D]``."""
        if metric not in METRICS:
            raise SaealignError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
        topic = np.asarray(topic_embeddings, dtype=np.float32)
        if topic.ndim != 2 or topic.shape[0] == 0 or topic.shape[1] != int(self.manifest["dim"]):
            raise SaealignError(f"topic embeddings of shape {topic.shape} do not fit this index's "
                                f"{self.manifest['dim']}-wide embeddings")
        if not np.isfinite(topic).all():
            raise SaealignError("the topic embeddings contain NaN or inf: check the topic texts and the embedder")
        topic = topic / np.maximum(np.linalg.norm(topic, axis=1, keepdims=True), 1e-12)
        cos = np.concatenate([max_cosines(s.embeddings, s.inv_norms, topic) for s in self.shards])
        return distances_from_cosines(cos, metric)

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
        rows, values = [], []
        first = 0
        for s in self.shards:
            hit, w = column(s.packed, s.code_ptr, s.lo, s.step, latent)
            rows.append(hit + first)
            values.append(w * s.totals[hit])
            first += s.n_prompts
        row, value = np.concatenate(rows), np.concatenate(values)
        order = np.lexsort((row, -value))[:n]
        return [(self.text(int(row[i])), float(value[i])) for i in order]
