"""Building a reference index on a Ray cluster (``saealign index build --engine ray``; extra ``ray``).

The corpus becomes a Ray dataset of shard records (shard number + its texts); ``map_batches`` runs
them through a pool of actors, each holding its own model, SAE and embedder (one actor per GPU, or
per ``cpus_per_worker`` CPUs). Every actor writes its shards into the index folder with the same
:class:`~saealign.reference.workers.ShardMaker` as the single-process build, so the shards are the
same; the driver records each in the manifest as it arrives, so a build that stops (driver or
workers killed) resumes with the shards it lacks. The folder must be storage every node sees (NFS,
a mounted bucket ...): docs/scaling.md shows a multi-node run.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from saealign.errors import SaealignError
from saealign.reference.corpus import Corpus
from saealign.reference.index import (
    ReferenceIndex,
    add_record,
    cache_folder,
    embedding_store,
    finish,
    missing_shards,
    prepare_folder,
    stack_keys,
)
from saealign.reference.manifest import IndexConfig, IndexKeys
from saealign.reference.shards import ShardRecord
from saealign.reference.workers import BuildSpec, ShardMaker


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra of ray
    except ImportError:
        raise SaealignError("--engine ray needs Ray Data: pip install 'saealign[ray]' (or 'ray[data]')") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` (else ``$RAY_ADDRESS``, else start a local one); True if we started Ray.

    An address that does not answer is one clear error within seconds, not a minute of retries.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SaealignError(f"cannot reach the Ray cluster at {address or 'a new local instance'} "
                            f"({str(e).splitlines()[0][:160]}): start one with `ray start --head` "
                            "or fix --ray-address / RAY_ADDRESS") from None
    return True


def _check_reachable(address: str) -> None:
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SaealignError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379 or ray://10.0.0.1:10001)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise SaealignError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): start it with "
                            "`ray start --head` on that machine or fix --ray-address / RAY_ADDRESS") from None


class _RayShardWorker:
    """One actor: loads the stack once, then turns shard records into shard files."""

    def __init__(self, spec: BuildSpec, cfg: IndexConfig, folder: str, keys: IndexKeys) -> None:
        lm, sae, embedder = spec.load()
        self.maker = ShardMaker(lm, sae, embedder, cfg, embedding_store(keys, cfg))
        self.folder = Path(folder)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "record": [], "latents_s": [], "embeddings_s": []}
        for shard, texts in zip(batch["shard"], batch["texts"], strict=True):
            record, timings = self.maker(self.folder, int(shard), [str(t) for t in texts])
            out["shard"].append(int(shard))
            out["record"].append(record.__dict__)
            out["latents_s"].append(timings["latents_s"])
            out["embeddings_s"].append(timings["embeddings_s"])
        return out


def _stack_facts(spec: BuildSpec, layer: int, corpus: Corpus) -> tuple[IndexKeys, int, int]:
    """Keys, SAE width and embedding width, from one load of the stack (where the actors run)."""
    from saealign.residual_stream import layer_module
    from saealign.sae.formats import check_sae_fits

    lm, sae, embedder = spec.load()
    check_sae_fits(sae, lm.d_model, f"layer {layer}")
    layer_module(lm.model, layer)
    return stack_keys(lm, sae, layer, corpus, embedder), sae.d_sae, int(embedder.dim)


def build_index_ray(spec: BuildSpec, corpus: Corpus, folder: Path | None, cfg: IndexConfig, *, address: str | None = None,
                    workers: int | None = None, cpus_per_worker: float = 1.0, progress: bool = True) -> ReferenceIndex:
    """Build (or resume) the index of ``corpus`` at ``folder`` on Ray; same folder format as :func:`build_index`.

    ``folder`` None: the user cache, where the single-process build of the same keys would go.
    ``workers``: actors in the pool (default: one per GPU when ``spec.device`` is CUDA, else one per
    ``cpus_per_worker`` CPUs of the cluster).
    """
    ray = _ray()
    started = connect(address)
    try:
        gpu = spec.device.startswith("cuda")
        resources = {"num_cpus": cpus_per_worker, "num_gpus": 1 if gpu else 0}
        facts = ray.remote(**resources)(_stack_facts)
        keys, d_sae, dim = ray.get(facts.remote(spec, cfg.layer, corpus))
        folder = folder or cache_folder(keys)
        manifest = prepare_folder(folder, corpus, cfg, keys, d_sae, dim)
        todo = missing_shards(folder, manifest)
        if todo:
            total = ray.cluster_resources().get("GPU" if gpu else "CPU", 1)
            pool = max(1, min(len(todo), workers or int(total // (1 if gpu else cpus_per_worker)) or 1))
            data = ray.data.DataContext.get_current()
            data.enable_progress_bars = False  # one bar, the driver's, counts prompts
            if hasattr(data, "print_on_execution_start"):
                data.print_on_execution_start = False  # else Ray Data prints its whole configuration
            items: list[dict[str, Any]] = [{"shard": s, "texts": corpus.texts[s * cfg.shard_size : (s + 1) * cfg.shard_size]}
                                           for s in todo]
            shards = ray.data.from_items(items, override_num_blocks=len(items))
            made = shards.map_batches(
                _RayShardWorker, batch_size=1, concurrency=pool, batch_format="numpy",
                fn_constructor_kwargs={"spec": spec, "cfg": cfg, "folder": str(folder), "keys": keys}, **resources,
            )
            with tqdm(total=sum(len(i["texts"]) for i in items), desc=f"index L{cfg.layer} (ray, {pool} workers)",
                      unit="prompt", disable=not progress) as bar:
                for row in made.iter_rows():
                    record = ShardRecord.from_json(row["record"])
                    add_record(folder, manifest, int(row["shard"]), record,
                               {"latents_s": float(row["latents_s"]), "embeddings_s": float(row["embeddings_s"])})
                    bar.update(record.count)
        return finish(folder, manifest)
    finally:
        if started:
            ray.shutdown()
