"""Reference-index build throughput vs the raw work it must do, same process.

Run: ``python bench/bench_index.py [--prompts 2000] [--layer 15]``.

Raw work = the partial forward to the layer (same tokenisation, batching and truncation) plus the
MiniLM embeddings of the same texts, each timed alone. The build (SAE encode, per-prompt sparse
statistics, sharded atomic writes) should reach >= 0.7 of the raw throughput. Uses a fresh
temporary cache so no embedding is reused. Prints prompts/s of each and the peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from saealign.defaults import DEFAULT_LAYER, default_corpus_spec, resolve_sae
from saealign.models import content_mask, load_model, residuals_at, special_token_ids
from saealign.reference.corpus import read_corpus, sample
from saealign.reference.embed import Embedder
from saealign.reference.index import IndexConfig, build_index


def raw_forward(lm, texts: list[str], cfg: IndexConfig) -> float:  # noqa: ANN001 - a LoadedModel
    tok = lm.tokenizer
    special = special_token_ids(tok)
    enc = [tok(t, truncation=True, max_length=cfg.max_seq_len)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    start = time.perf_counter()
    for b in range(0, len(order), cfg.batch_size):
        rows = [enc[i] for i in order[b : b + cfg.batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(tok.pad_token_id))
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        keep = content_mask(ids, mask, special)
        residuals_at(lm.model, cfg.layer, ids, mask)[keep]
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SAEALIGN_CACHE"] = tmp  # fresh embedding store: nothing reused
        lm = load_model("default")
        sae = resolve_sae(f"default:{args.layer}")
        embedder = Embedder.default()
        corpus = sample(read_corpus(default_corpus_spec()), args.prompts, seed=1)
        cfg = IndexConfig(layer=args.layer)
        forward_s = raw_forward(lm, corpus.texts, cfg)
        start = time.perf_counter()
        embedder.embed(corpus.texts)
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        build_index(lm, sae, corpus, embedder, Path(tmp) / "index", cfg, progress=False)
        build_s = time.perf_counter() - start
    n = len(corpus)
    raw_s = forward_s + embed_s
    ratio = raw_s / build_s
    print(f"{n} WordNet prompts, layer {args.layer}, dtype {next(lm.model.parameters()).dtype}")
    print(f"raw partial forward {n / forward_s:.0f} prompts/s, raw embeddings {n / embed_s:.0f} prompts/s, "
          f"together {n / raw_s:.0f} prompts/s")
    print(f"index build {n / build_s:.0f} prompts/s ({build_s:.1f} s) -> {ratio:.2f} of the raw throughput (target >= 0.7)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0 if ratio >= 0.7 else 1


if __name__ == "__main__":
    raise SystemExit(main())
