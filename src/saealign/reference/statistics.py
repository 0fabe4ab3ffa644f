"""Per-prompt SAE statistics of a run of texts, and their compaction into one index shard.

:func:`prompt_statistics` runs the partial forward and the SAE and returns, for every (prompt,
latent) pair that fires, the sum, max and count of its token activations. :func:`compact_shard`
keeps what M1 needs in under 1 KB a prompt (the default SAE fires ~300 latents a prompt):

- every firing latent of every prompt with its normalised-sum value, 12 bits an entry
  (:mod:`codec`: the pattern exact, the value to ±3 %);
- each prompt's total activation and token count, so the ``sum`` and ``mean`` summaries follow;
- per latent, exact statistics (prompts fired on, max and total activation): the min-prompts rule
  and Clamp's maximum are not approximated;
- the sentence embedding as int8 with one float32 inverse norm a row (cosines to ~1e-3).

Not kept: per-entry token maxima, so the ``max`` summary of the paper's ablation needs an exact
statistics pass (docs/scaling.md).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from saealign.models import LoadedModel
from saealign.reference.codec import encode
from saealign.reference.shards import Shard
from saealign.residual_stream import (
    content_mask,
    massive_positions,
    residuals_at,
    right_pad,
    special_token_ids,
)
from saealign.sae.autoencoder import SAE


@torch.inference_mode()
def prompt_statistics(
    lm: LoadedModel, sae: SAE, layer: int, texts: list[str], max_seq_len: int = 128, batch_size: int = 32,
    drop_massive: bool = False,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """SAE statistics of ``texts``: ``(CSR [n, L] of act_sum, act_max data, act_count data, n_tokens [n])``.

    Content tokens only (first position and special tokens left out, as in SAE training). Inputs go
    to the model's device; batches are sorted by length so little is padded. ``drop_massive`` also leaves
    out later attention sinks (:func:`saealign.residual_stream.massive_positions`); the index is built
    without it, so that its shipped statistics stay what they were.
    """
    tok = lm.tokenizer
    special = special_token_ids(tok)
    device = next(lm.model.parameters()).device
    enc = [tok(t, truncation=True, max_length=max_seq_len)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    d_sae = sae.d_sae
    # Gathered sparsely, as (prompt, latent, value) triples of the active latents: dense [prompts, d_sae]
    # accumulators with index_add/scatter_reduce made the build 2.4x slower (bench_index).
    keys: list[np.ndarray] = []
    values: list[np.ndarray] = []
    n_tokens = np.zeros(len(texts), dtype=np.int32)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        ids, mask = right_pad([enc[r] for r in rows], int(tok.pad_token_id))
        keep = content_mask(ids, mask, special).to(device)
        hidden = residuals_at(lm.model, layer, ids.to(device), mask.to(device))
        if drop_massive:
            keep = keep & ~massive_positions(hidden, keep)
        x = hidden[keep]
        keep = keep.cpu()
        acts = sae.encode(x).float().cpu()
        token, latent = acts.nonzero(as_tuple=True)
        owner = torch.tensor(rows)[keep.nonzero()[:, 0]]
        keys.append((owner[token].long() * d_sae + latent).numpy())
        values.append(acts[token, latent].numpy())
        n_tokens[rows] = keep.sum(dim=1).numpy()
    flat_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    flat_values = np.concatenate(values) if values else np.zeros(0, np.float32)
    return (*combine(flat_keys, flat_values, len(texts), d_sae), n_tokens)


def combine(keys: np.ndarray, values: np.ndarray, n: int, d_sae: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
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
    live = sums > 0  # TopK/ReLU activations are >= 0: a zero sum is a latent that did not fire
    unique, sums, maxes, counts = unique[live], sums[live], np.maximum(maxes[live], 0), counts[live]
    rows, cols = unique // d_sae, unique % d_sae
    indptr = np.searchsorted(rows, np.arange(n + 1)).astype(np.int64)
    pattern = sp.csr_matrix((sums.astype(np.float32), cols.astype(np.int32), indptr), shape=(n, d_sae))
    return pattern, maxes.astype(np.float32), counts.astype(np.float32)


def quantize_embeddings(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[n, D]`` float -> (int8 ``[n, D]`` using the full ±127 range of each row, float32 ``1/|q|`` ``[n]``).

    Only directions matter (distances are taken between unit vectors), so the row scale is not kept:
    ``cos(q, t) = (q . t) * inv_norm`` for a unit ``t``.
    """
    e = np.asarray(emb, dtype=np.float64)
    peak = np.abs(e).max(axis=1, keepdims=True) if e.size else np.ones((e.shape[0], 1))
    q = np.rint(e / np.where(peak > 0, peak, 1.0) * 127.0).astype(np.int8)
    norms = np.linalg.norm(q.astype(np.float64), axis=1)
    if e.shape[0] and not (np.isfinite(e).all() and (norms > 0).all()):
        raise ValueError("embeddings must be finite and non-zero to be stored")
    return q, (1.0 / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def compact_shard(act_sum: sp.csr_matrix, act_max: np.ndarray, n_tokens: np.ndarray, embeddings: np.ndarray
                  ) -> tuple[Shard, int]:
    """One :class:`~saealign.reference.shards.Shard` (and its entry count) from a run's full statistics."""
    n, d_sae = act_sum.shape
    act_sum = sp.csr_matrix(act_sum)
    act_sum.sort_indices()
    sums = act_sum.data.astype(np.float64)
    rows = np.repeat(np.arange(n), np.diff(act_sum.indptr))
    cols = act_sum.indices.astype(np.int64)
    totals = np.bincount(rows, weights=sums, minlength=n)
    weights = sums / np.where(totals > 0, totals, 1.0)[rows]
    packed, code_ptr, lo, step = encode(act_sum.indptr, cols, weights)
    latent_max = np.zeros(d_sae, dtype=np.float32)
    np.maximum.at(latent_max, cols, np.asarray(act_max, dtype=np.float32))
    q, inv_norms = quantize_embeddings(embeddings)
    shard = Shard(
        packed=packed, code_ptr=code_ptr, lo=lo, step=step, totals=totals.astype(np.float32),
        n_tokens=np.asarray(n_tokens, dtype=np.int32), embeddings=q, inv_norms=inv_norms,
        latent_prompts=np.bincount(cols, minlength=d_sae).astype(np.int32), latent_max=latent_max,
        latent_total=np.bincount(cols, weights=sums, minlength=d_sae).astype(np.float32),
    )
    return shard, len(sums)
