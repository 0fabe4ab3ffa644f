"""Reference-index build throughput: the raw work it must do, the single-process build, the Ray build.

Run: ``python bench/bench_index.py [--prompts 2000] [--layer 15] [--ray-workers 2]``.

Raw work = the partial forward to the layer (same tokenisation, batching and truncation) plus the
MiniLM embeddings of the same texts, each timed alone. Then the same prompts are indexed twice,
each from an empty embedding store (no embedding reused): in this process (``build_index``) and on a local Ray
instance (``build_index_ray``, ``--ray-workers`` actors of one CPU each, started inside the timing:
what a user of ``--engine ray`` waits for). Both indexes must be the same; prints prompts/s, the
Ray/single time ratio and the peak RSS of this process.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saealign.defaults import DEFAULT_LAYER, DEFAULT_SAE_DIR, default_corpus_spec, resolve_sae
from saealign.models import load_model
from saealign.reference.corpus import sample
from saealign.reference.corpus_spec import read_corpus
from saealign.reference.embed import Embedder
from saealign.reference.index import IndexConfig, build_index, embedding_store, stack_keys
from saealign.residual_stream import content_mask, residuals_at, right_pad, special_token_ids


def raw_forward(lm, texts: list[str], cfg: IndexConfig) -> float:  # noqa: ANN001 - a LoadedModel
    tok = lm.tokenizer
    special = special_token_ids(tok)
    enc = [tok(t, truncation=True, max_length=cfg.max_seq_len)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    start = time.perf_counter()
    for b in range(0, len(order), cfg.batch_size):
        rows = [enc[i] for i in order[b : b + cfg.batch_size]]
        ids, mask = right_pad(rows, int(tok.pad_token_id))
        keep = content_mask(ids, mask, special)
        residuals_at(lm.model, cfg.layer, ids, mask)[keep]
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    parser.add_argument("--ray-workers", type=int, default=2, help="0 skips the Ray build")
    parser.add_argument("--shard-size", type=int, default=250, help="small enough that every worker gets shards")
    args = parser.parse_args()
    corpus = sample(read_corpus(default_corpus_spec()), args.prompts, seed=1)
    cfg = IndexConfig(layer=args.layer, shard_size=args.shard_size)
    n = len(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model("default")  # the converted model in the user cache is reused; embeddings are not
        sae = resolve_sae(f"default:{args.layer}")
        embedder = Embedder.default()
        store = embedding_store(stack_keys(lm, sae, args.layer, corpus, embedder), cfg)
        shutil.rmtree(store, ignore_errors=True)
        forward_s = raw_forward(lm, corpus.texts, cfg)
        start = time.perf_counter()
        embedder.embed(corpus.texts)
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        single = build_index(lm, sae, corpus, embedder, Path(tmp) / "single-index", cfg, progress=False)
        build_s = time.perf_counter() - start
        raw_s = forward_s + embed_s
        print(f"{n} WordNet prompts, layer {args.layer}, dtype {next(lm.model.parameters()).dtype}, "
              f"{torch.get_num_threads()} torch threads")
        print(f"raw partial forward {n / forward_s:.0f} prompts/s, raw embeddings {n / embed_s:.0f} prompts/s, "
              f"together {n / raw_s:.0f} prompts/s")
        print(f"single-process build {n / build_s:.1f} prompts/s ({build_s:.1f} s) -> {raw_s / build_s:.2f} of the raw "
              "throughput (target >= 0.7)")
        ok = raw_s / build_s >= 0.7
        if args.ray_workers:
            from saealign.reference.ray_engine import build_index_ray, connect
            from saealign.reference.workers import BuildSpec

            shutil.rmtree(store, ignore_errors=True)  # the actors start from an empty embedding store too
            spec = BuildSpec(model="default", sae=str(DEFAULT_SAE_DIR / f"layer_{args.layer}"))
            start = time.perf_counter()
            connect(num_cpus=args.ray_workers)
            on_ray = build_index_ray(spec, corpus, Path(tmp) / "ray-index", cfg, workers=args.ray_workers,
                                     progress=False)
            ray_s = time.perf_counter() - start
            import ray

            ray.shutdown()
            same = on_ray.manifest["keys"] == single.manifest["keys"]
            same_shards = on_ray.manifest["shards"] == single.manifest["shards"]
            print(f"Ray build, {args.ray_workers} actors x 1 CPU, local instance started inside the timing: "
                  f"{n / ray_s:.1f} prompts/s ({ray_s:.1f} s); Ray / single-process time = {ray_s / build_s:.2f}")
            print(f"same keys: {same}; byte-identical shards: {same_shards} "
                  "(float sums may differ in the last bit with the actors' thread count)")
            ok = ok and same
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
