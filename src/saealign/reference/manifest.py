"""An index folder's manifest: how it was built, from what, and which shard files hold it.

``manifest.json`` is the only file that says an index is (partly) built. A shard counts only when
the manifest lists it with a checksum that its file still matches; whatever a killed build or
worker left behind is recomputed, never trusted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saealign.cache import atomic_write_json
from saealign.errors import SaealignError
from saealign.reference.shards import ShardRecord

FORMAT = "saealign-reference-index"
VERSION = 2
TEXTS_FILE = "texts.jsonl.gz"


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
    """Prompts per shard: the unit of resumption, of parallel work and of bounded memory."""

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


def new_manifest(cfg: IndexConfig, keys: IndexKeys, n_prompts: int, d_sae: int, dim: int, corpus_name: str
                 ) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "config": asdict(cfg), "keys": asdict(keys),
        "n_prompts": n_prompts, "n_shards": -(-n_prompts // cfg.shard_size), "d_sae": d_sae, "dim": dim,
        "complete": False, "corpus_name": corpus_name, "timings": {}, "shards": {}, "files": {},
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise SaealignError(f"no index at {folder}: build one with `saealign index build`") from None
    except (OSError, ValueError) as e:
        raise SaealignError(f"index at {folder} is corrupt (manifest unreadable: {e}): delete it and rebuild") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SaealignError(f"{folder} is not a saealign index of version {VERSION}: rebuild it")
    if manifest.get("version") != VERSION:
        raise SaealignError(f"{folder} is not a saealign index of version {VERSION} (it is version "
                            f"{manifest.get('version')}): rebuild it with `saealign index build`")
    missing = [k for k in ("config", "keys", "n_prompts", "n_shards", "d_sae", "dim", "shards", "files")
               if k not in manifest]
    if missing:
        raise SaealignError(f"index at {folder} is corrupt (manifest lacks {missing}): delete it and rebuild")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(folder / "manifest.json", manifest)


def shard_name(shard: int) -> str:
    return f"shards/{shard:05d}.safetensors"


def shard_records(manifest: dict[str, Any]) -> dict[int, ShardRecord]:
    return {int(k): ShardRecord.from_json(v) for k, v in manifest["shards"].items()}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``what old != new`` for every key and setting that differs, each named once."""
    parts = [f"{k} {old.get('keys', {}).get(k)} != {v}" for k, v in new["keys"].items()
             if old.get("keys", {}).get(k) != v]
    parts += [f"{k} {old.get('config', {}).get(k)} != {v}" for k, v in new["config"].items()
              if k not in new["keys"] and old.get("config", {}).get(k) != v]
    return parts


def check_keys(folder: Path, keys: IndexKeys, **wanted: str | int | None) -> None:
    """Refuse, in one line naming the part that differs, an index built for another model/SAE/layer/corpus/embedder."""
    names = {"model": "model", "sae": "SAE", "layer": "layer", "corpus": "corpus", "embedder": "embedder"}
    for field, want in wanted.items():
        have = getattr(keys, field)
        if want is not None and want != have:
            raise SaealignError(
                f"index at {folder} was built for {names[field]} {have}, not {want}: "
                "rebuild it with `saealign index build`"
            )
