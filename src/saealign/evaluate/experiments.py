"""The computational core of the paper's latent-level experiments, as pure functions returning rows.

- :func:`coverage_curve` (Fig. 3): how many latents a reference set of each size lets M1 score;
- :func:`topk_token_share` (Fig. 4): do held-out topic tokens fire the top-k scored latents more
  often than unrelated tokens;
- :func:`summary_ablation` (appendix A.2): how much the prompt-level summary function changes
  the ranking of latents (Kendall tau, top-n overlap).

The layer-level experiment (Fig. 5/6) is in :mod:`saealign.evaluate.layer_stats`. Every function
returns ``list[dict]`` of plain numbers and strings, ready for :mod:`saealign.evaluate.report`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import TextEmbedder
from saealign.reference.index import ReferenceIndex
from saealign.reference.scoring import SUMMARIES, TopicScores, kendall_tau, score_topic
from saealign.residual_stream import content_mask, residuals_at, special_token_ids
from saealign.sae.autoencoder import SAE

COVERAGE_SIZES = tuple(2**e for e in range(8, 18))
TOPK_KS = (1, 5, 10, 20, 50, 100)


# -- Fig. 3: coverage --------------------------------------------------------------------------------
def coverage_curve(
    index: ReferenceIndex,
    sizes: Sequence[int] = COVERAGE_SIZES,
    samples: int = 5,
    seed: int = 0,
    min_prompts: int = 20,
    replace: bool = False,
) -> list[dict[str, Any]]:
    """Share of the index's live latents that a random reference set of each size would cover.

    A latent is *live* when it fires on >= 1 prompt of the whole index (dead latents can never be
    covered, so they are left out of the denominator; ``live / d_sae`` is in every row). For each
    size in ``sizes`` no larger than the index, and for the full index, ``samples`` random prompt
    sets are drawn (independently of each other; within one set without repetition unless
    ``replace``, so the full size without ``replace`` is the whole index, exactly). Counts come
    from the CSR pattern of the sampled rows: nothing ``[prompts x latents]`` is densified.

    Row per size: ``size, samples, d_sae, live, live_share`` and, as mean/min/max over samples,
    ``active_*`` (share of live latents firing on >= 1 sampled prompt) and ``scored_*`` (share
    firing on >= ``min_prompts`` sampled prompts: those M1 would score).
    """
    if samples < 1 or min_prompts < 1:
        raise SaealignError(f"coverage needs samples >= 1 and min_prompts >= 1, got {samples} and {min_prompts}")
    if any(int(s) < 1 for s in sizes):
        raise SaealignError(f"coverage sizes must be positive prompt counts, got {list(sizes)}")
    n = index.n_prompts
    pattern = index.act_sum
    live = index.latent_n_prompts > 0
    n_live = int(live.sum())
    if n_live == 0:
        raise SaealignError("no latent fires on any prompt of this index: the index or SAE is broken, rebuild it")
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for size in sorted({int(s) for s in sizes if int(s) <= n} | {n}):
        active, scored = [], []
        for _ in range(samples):
            picks = rng.choice(n, size=size, replace=replace) if (replace or size < n) else np.arange(n)
            sub = pattern[picks]  # CSR row selection; a prompt drawn twice counts twice
            counts = np.bincount(sub.indices[sub.data > 0], minlength=index.d_sae)
            active.append(float((counts[live] >= 1).sum()) / n_live)
            scored.append(float((counts[live] >= min_prompts).sum()) / n_live)
        row: dict[str, Any] = {"size": size, "samples": samples, "d_sae": index.d_sae, "live": n_live,
                               "live_share": n_live / index.d_sae}
        for name, values in (("active", active), ("scored", scored)):
            row |= {f"{name}_mean": float(np.mean(values)), f"{name}_min": min(values), f"{name}_max": max(values)}
        rows.append(row)
    return rows


# -- content-token activations (shared with layer_stats) -------------------------------------------
@torch.inference_mode()
def content_residuals(
    lm: LoadedModel, layer: int, texts: Sequence[str], max_seq_len: int = 128, batch_size: int = 16
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Residuals after block ``layer`` at the content tokens of ``texts``, one batch at a time.

    Yields ``(x [n, d_model], text [n] int64, token_id [n] int64)`` for the batch's content tokens
    (padding, special tokens and each text's first position left out, as in the index: the first
    position's norm is an outlier the SAE never saw). Texts are truncated to ``max_seq_len`` tokens
    and batched in order, right-padded.
    """
    if max_seq_len < 2 or batch_size < 1:
        raise SaealignError(f"need max_seq_len >= 2 and batch_size >= 1, got {max_seq_len} and {batch_size}")
    tok = lm.tokenizer
    special = special_token_ids(tok)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    device = next(lm.model.parameters()).device
    for b in range(0, len(texts), batch_size):
        enc = [tok(t, truncation=True, max_length=max_seq_len)["input_ids"] for t in texts[b : b + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[j, : len(e)] = 1
        keep = content_mask(ids, mask, special)
        x = residuals_at(lm.model, layer, ids.to(device), mask.to(device))[keep.to(device)]
        yield x, keep.nonzero()[:, 0] + b, ids[keep]


def _texts(texts: Sequence[str], what: str) -> list[str]:
    out = [t for t in texts if isinstance(t, str) and t.strip()]
    if not out:
        raise SaealignError(f"no {what} texts given: pass at least one non-empty text")
    return out


def latent_ranks(scores: TopicScores | np.ndarray, d_sae: int) -> tuple[np.ndarray, int]:
    """Rank of every latent (0 = best) by score, and how many are ranked.

    A :class:`TopicScores` ranks its scored latents in :meth:`TopicScores.top` order (unscored ones
    get rank ``d_sae``: never in any top-k); a plain ``[d_sae]`` array ranks every latent, score
    descending, ties by index.
    """
    if isinstance(scores, TopicScores):
        if scores.d_sae != d_sae:
            raise SaealignError(f"scores cover {scores.d_sae} latents but the SAE has {d_sae}: score with this SAE")
        order = np.asarray(scores.top(int(scores.scored.sum())), dtype=np.int64)
    else:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (d_sae,) or not np.isfinite(s).all():
            raise SaealignError(f"scores must be a finite [{d_sae}] vector, got shape {s.shape}")
        order = np.argsort(-s, kind="stable")
    ranks = np.full(d_sae, d_sae, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return ranks, int(order.size)


# -- Fig. 4: top-k token share -----------------------------------------------------------------------
@torch.inference_mode()
def _best_rank(sae: SAE, lm: LoadedModel, layer: int, ranks: np.ndarray, texts: list[str],
               max_seq_len: int, batch_size: int) -> np.ndarray:
    """Per content token, the best rank among its active latents (``d_sae`` if none is ranked or active)."""
    out = []
    for x, _, _ in content_residuals(lm, layer, texts, max_seq_len, batch_size):
        if sae.W_enc.device != x.device:
            raise SaealignError(f"the SAE is on {sae.W_enc.device} but the model on {x.device}: move one with .to()")
        acts = sae.encode(x)
        r = torch.as_tensor(ranks, device=acts.device)
        masked = torch.where(acts != 0, r, torch.full_like(r, sae.d_sae))
        out.append(masked.min(dim=-1).values.cpu().numpy())
    best = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    if best.size == 0:
        raise SaealignError("the texts have no content tokens (only special tokens or one token each): pass longer texts")
    return best


def topk_token_share(
    sae: SAE,
    lm: LoadedModel,
    layer: int,
    scores: TopicScores | np.ndarray,
    aligned_texts: Sequence[str],
    unaligned_texts: Sequence[str],
    ks: Sequence[int] = TOPK_KS,
    max_seq_len: int = 128,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Share of held-out aligned vs unaligned tokens on which any of the top-k scored latents fires.

    Tokens are the content tokens of each text (as in the index) at the residual stream after
    block ``layer``, encoded with ``sae``. The top-k are the k best *scored* latents
    (:func:`latent_ranks`); with fewer than k ranked latents all of them are used (``k_used``).

    Row per k: ``k, k_used, aligned_share, unaligned_share, difference`` (aligned − unaligned),
    ``aligned_tokens, unaligned_tokens``.
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise SaealignError(f"ks must be positive latent counts, got {list(ks)}")
    ranks, n_ranked = latent_ranks(scores, sae.d_sae)
    best = {kind: _best_rank(sae, lm, layer, ranks, _texts(texts, kind), max_seq_len, batch_size)
            for kind, texts in (("aligned", aligned_texts), ("unaligned", unaligned_texts))}
    rows: list[dict[str, Any]] = []
    for k in ks:
        k_used = min(int(k), n_ranked)
        shares = {kind: float((b < k_used).mean()) for kind, b in best.items()}
        rows.append({"k": int(k), "k_used": k_used, "aligned_share": shares["aligned"],
                     "unaligned_share": shares["unaligned"], "difference": shares["aligned"] - shares["unaligned"],
                     "aligned_tokens": int(best["aligned"].size), "unaligned_tokens": int(best["unaligned"].size)})
    return rows


# -- appendix A.2: summary functions -----------------------------------------------------------------
def summary_ablation(
    index: ReferenceIndex,
    topic_texts: Sequence[str],
    embedder: TextEmbedder,
    summaries: Sequence[str] | None = None,
    top: Sequence[int | None] = (None, 100),
    overlap: int = 20,
    min_prompts: int = 20,
    metric: str = "euclidean",
) -> list[dict[str, Any]]:
    """Agreement of the latent rankings that different prompt-level summaries give one topic.

    The topic is embedded once; each summary scores it against the same distances. Row per ordered
    pair ``(a, b)`` of ``summaries``, the diagonal included (a symmetric table): ``a, b``, a Kendall
    tau-b column per entry of ``top`` (``tau_all`` over all latents scored in both, ``tau_top{n}``
    over the union of each side's n best, see :func:`saealign.reference.scoring.kendall_tau`; NaN where tau
    is undefined, e.g. all scores tied) and ``overlap_top{overlap}``, the shared share of the two
    top-``overlap`` sets.
    """
    summaries = index.summaries if summaries is None else summaries  # a compact index keeps no token maxima
    bad = [s for s in summaries if s not in SUMMARIES]
    if bad or not summaries:
        raise SaealignError(f"unknown or no summaries {bad}: use some of {', '.join(SUMMARIES)}")
    if overlap < 1 or any(t is not None and t < 2 for t in top):
        raise SaealignError(f"need overlap >= 1 and top entries None or >= 2, got {overlap} and {list(top)}")
    texts = _texts(topic_texts, "topic")
    fingerprint = getattr(embedder, "fingerprint", type(embedder).__name__)
    if fingerprint != index.keys.embedder:
        raise SaealignError(f"this index was embedded with {index.keys.embedder}, not {fingerprint}: "
                            "use the index's embedder")
    distances = index.distances(embedder.embed(texts), metric)
    scored = {s: score_topic(index.prepared(s), distances, min_prompts, topic_texts=texts, summary_kind=s,
                             metric=metric, index_key=index.key, sae_key=index.keys.sae) for s in summaries}
    rows: list[dict[str, Any]] = []
    for a in summaries:
        for b in summaries:
            row: dict[str, Any] = {"a": a, "b": b}
            for t in top:
                try:
                    tau = kendall_tau(scored[a], scored[b], top=t)
                except SaealignError:
                    tau = float("nan")
                row["tau_all" if t is None else f"tau_top{t}"] = tau
            best_a, best_b = scored[a].top(overlap), scored[b].top(overlap)
            size = min(len(best_a), len(best_b))
            row[f"overlap_top{overlap}"] = len(set(best_a) & set(best_b)) / size if size else float("nan")
            rows.append(row)
    return rows
