"""Metrics of generated text: judge perplexity, distance to the topic, repetition.

Perplexity is measured under an *independent* judge LM (default Gemma 3 270M, from its PyPI
wheels), conditioned on the prompt: only the continuation's tokens are scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from saealign.models import LoadedModel
from saealign.reference.embed import TextEmbedder, min_distances


@torch.inference_mode()
def continuation_nll(judge: LoadedModel, prompts: Sequence[str], texts: Sequence[str], batch: int = 8) -> list[tuple[float, int]]:
    """``(summed NLL in nats, scored tokens)`` of each continuation given its prompt, under ``judge``."""
    tok = judge.tokenizer
    out: list[tuple[float, int]] = []
    for b in range(0, len(prompts), batch):
        rows = []
        for prompt, text in zip(prompts[b : b + batch], texts[b : b + batch], strict=True):
            p_ids = tok(prompt)["input_ids"]
            full = tok(prompt + text)["input_ids"]
            # Tokenisation of the joint string may merge at the boundary: score from the first differing id.
            start = next((i for i, (a, c) in enumerate(zip(p_ids, full, strict=False)) if a != c), len(p_ids))
            rows.append((full, max(1, start)))
        width = max(len(r) for r, _ in rows)
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros_like(ids)
        for i, (r, _) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logp = torch.log_softmax(judge.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        nll = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for i, (r, start) in enumerate(rows):
            span = nll[i, start - 1 : len(r) - 1]
            out.append((float(span.sum()), int(span.numel())))
    return out


def perplexity(nll: Sequence[tuple[float, int]]) -> float:
    """Token-weighted perplexity over several texts: ``exp(Σ nll / Σ tokens)``."""
    total, n = sum(x for x, _ in nll), sum(c for _, c in nll)
    return math.exp(total / n) if n else float("nan")


def per_text_perplexity(nll: Sequence[tuple[float, int]]) -> list[float]:
    return [math.exp(x / c) if c else float("nan") for x, c in nll]


def topic_distance(embedder: TextEmbedder, texts: Sequence[str], topic_embeddings: np.ndarray) -> np.ndarray:
    """Min MiniLM (euclidean, unit vectors) distance of each text to the topic texts: ``[n]``."""
    safe = [t if t.strip() else "." for t in texts]  # an empty generation still gets a (large) distance
    return min_distances(embedder.embed(list(safe)), topic_embeddings)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Share of distinct word n-grams among all n-grams (1 = no repetition): a degeneration signal."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        words = t.split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
