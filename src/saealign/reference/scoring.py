"""M1: score every SAE latent by how close to a topic the reference prompts it fires on are.

Pure functions over a sparse prompt x latent matrix (METHOD.md "M1"), producing
:class:`~saealign.reference.topic_scores.TopicScores`. Nothing here runs a model: a topic costs one sparse mat-vec over the index.

1. :func:`summary_matrix` turns the index's per-prompt statistics into ``summary [P, L]``;
2. :func:`saealign.reference.embed.min_distances` gives ``d(p)``, the distance of each reference prompt to the topic;
3. :func:`latent_g` computes ``g_i``, the activation-weighted mean distance of latent i's prompts;
4. :func:`scores_from_g` maps g to scores in [0, 1], **1 = most aligned** (see its docstring for
   why this reverses the paper's printed eq. 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from saealign.errors import SaealignError
from saealign.reference.topic_scores import TopicScores

if TYPE_CHECKING:
    pass

SUMMARIES = ("normalized_sum", "sum", "mean", "max", "binary")
METRICS = ("euclidean", "cosine")
# g spans below this fraction of |g| are float32 accumulation noise, not a ranking.
_FLAT_RTOL = 1e-6


def summary_matrix(
    act_sum: sp.csr_matrix,
    act_max: sp.csr_matrix,
    act_count: sp.csr_matrix,
    n_tokens: np.ndarray,
    kind: str = "normalized_sum",
) -> sp.csr_matrix:
    """Prompt-level summaries ``[P, L]`` float32 CSR, sharing the sparsity pattern of ``act_sum``.

    ``act_sum``/``act_max``/``act_count`` ``[P, L]``: Σ_t a_i(p_t), max_t a_i(p_t) and #{t: a_i(p_t) > 0}
    over the counted tokens of prompt p; ``n_tokens [P]``: how many tokens were counted.

    - ``normalized_sum`` (default, the paper's eq. in 3.1): each row of ``act_sum`` divided by its
      total, so it sums to 1; an all-zero row stays zero.
    - ``sum``: ``act_sum``; ``mean``: ``act_sum / n_tokens[p]``; ``max``: ``act_max``.
    - ``binary``: the paper's "binary count" (A.2) read as *the prompt fires the latent at least
      once*: 1.0 where ``act_count > 0``, else 0, so g becomes an unweighted mean distance.
    """
    if kind not in SUMMARIES:
        raise SaealignError(f"unknown summary {kind!r}: use one of {', '.join(SUMMARIES)}")
    act_sum = _as_csr(act_sum, "act_sum")
    n_rows, _ = act_sum.shape
    sizes = np.diff(act_sum.indptr)
    data = act_sum.data.astype(np.float64)
    if kind == "normalized_sum":
        total = np.zeros(n_rows)
        rows = sizes > 0  # reduceat misreads empty rows, so sum only the non-empty ones
        if rows.any():
            total[rows] = np.add.reduceat(data, act_sum.indptr[:-1][rows])
        inv = np.divide(1.0, total, out=np.zeros_like(total), where=total != 0)
        data = data * np.repeat(inv, sizes)
    elif kind == "mean":
        n_tok = np.asarray(n_tokens, dtype=np.float64)
        if n_tok.shape != (n_rows,):
            raise SaealignError(f"n_tokens has shape {n_tok.shape}, expected ({n_rows},): one count per prompt")
        if np.any((n_tok <= 0) & (sizes > 0)):
            bad = int(np.flatnonzero((n_tok <= 0) & (sizes > 0))[0])
            raise SaealignError(f"prompt {bad} has activations but n_tokens 0: the index is inconsistent, rebuild it")
        inv = np.divide(1.0, n_tok, out=np.zeros_like(n_tok), where=n_tok > 0)
        data = data * np.repeat(inv, sizes)
    elif kind in ("max", "binary"):
        name, other = ("act_max", act_max) if kind == "max" else ("act_count", act_count)
        other = _as_csr(other, name)
        if other.shape != act_sum.shape or not (
            np.array_equal(other.indptr, act_sum.indptr) and np.array_equal(other.indices, act_sum.indices)
        ):
            raise SaealignError(f"{name} does not share act_sum's sparsity pattern: the index is inconsistent, rebuild it")
        data = other.data.astype(np.float64) if kind == "max" else (other.data > 0).astype(np.float64)
    return sp.csr_matrix((data.astype(np.float32), act_sum.indices, act_sum.indptr), shape=act_sum.shape)


def _as_csr(m: Any, name: str) -> sp.csr_matrix:
    if not sp.issparse(m):
        raise SaealignError(f"{name} must be a scipy sparse matrix [prompts, latents], got {type(m).__name__}")
    return m if isinstance(m, sp.csr_matrix) else sp.csr_matrix(m)


@dataclass(frozen=True)
class PreparedSummary:
    """A summary matrix with everything that does not depend on the topic computed once.

    Build with :func:`prepare_summary` when the index is loaded; every topic then costs one
    sparse mat-vec (``transposed @ d``) instead of re-deriving weights and prompt counts.
    """

    transposed: sp.csc_matrix
    """``summary.T`` ``[L, P]`` as a CSC view of the CSR summary (no copy of the data)."""
    weight: np.ndarray
    """``[L]`` float64: Σ_p summary_pi (the denominator of g)."""
    n_prompts: np.ndarray
    """``[L]`` int64: number of prompts with summary_pi > 0."""

    @property
    def n_prompts_total(self) -> int:
        return int(self.transposed.shape[1])


def prepare_summary(summary: sp.spmatrix | sp.sparray) -> PreparedSummary:
    """Validate ``summary [P, L]`` (finite, non-negative) and precompute weights and prompt counts."""
    s = _as_csr(summary, "summary")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float32)
    if not s.has_canonical_format:
        s = s.copy()
        s.sum_duplicates()  # a duplicated (p, i) entry would count prompt p twice
    if s.nnz and not np.isfinite(s.data).all():
        raise SaealignError("the summary matrix contains NaN or inf: the index is corrupt, rebuild it")
    if s.nnz and s.data.min() < 0:
        raise SaealignError("the summary matrix has negative entries: summaries must be post-activation (>= 0)")
    n_rows, n_latents = s.shape
    # Column sums as CSC mat-vecs: 3-5x faster than np.bincount over the index arrays.
    weight = s.T @ np.ones(n_rows, dtype=np.float64)
    fires = s.data > 0
    if n_rows < 2**24:  # float32 counts are exact below 2^24
        pattern = sp.csr_matrix((fires.astype(np.float32), s.indices, s.indptr), shape=s.shape)
        n_prompts = np.rint(pattern.T @ np.ones(n_rows, dtype=np.float32)).astype(np.int64)
    else:
        n_prompts = np.bincount(s.indices[fires], minlength=n_latents).astype(np.int64)
    return PreparedSummary(transposed=s.T, weight=np.asarray(weight, dtype=np.float64), n_prompts=n_prompts)


def latent_g(
    summary: sp.spmatrix | sp.sparray | PreparedSummary, distances: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``g_i = Σ_p summary_pi d_p / Σ_p summary_pi`` over the prompts where latent i fires.

    ``summary``: ``[P, L]`` sparse, or a :class:`PreparedSummary` (faster: pass one for repeated
    topics); ``distances``: ``[P]``. Returns ``(g [L] float64, weight [L] float64, n_prompts [L] int64)``;
    ``g`` is NaN exactly where a latent never fires (weight 0): undefined, and always unscored.
    """
    prep = summary if isinstance(summary, PreparedSummary) else prepare_summary(summary)
    d = _check_distances(distances, prep.n_prompts_total)
    # Centre d before the mat-vec: the float32 accumulation error then scales with the spread of
    # the distances, not their size (equal distances give equal g up to one rounding).
    centre = float(d.mean()) if d.size else 0.0
    num = prep.transposed @ (d - centre).astype(prep.transposed.dtype)
    g = np.full(prep.weight.shape, np.nan)
    fires = prep.weight > 0
    g[fires] = centre + num[fires] / prep.weight[fires]
    return g, prep.weight, prep.n_prompts


def _check_distances(distances: np.ndarray, n_prompts: int) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64)
    if d.shape != (n_prompts,):
        raise SaealignError(
            f"distances have shape {d.shape} but the index has {n_prompts} prompts: recompute them against this index"
        )
    bad = ~np.isfinite(d)
    if bad.any():
        raise SaealignError(
            f"{int(bad.sum())} distances are NaN or inf (first at prompt {int(np.flatnonzero(bad)[0])}): "
            "check the embeddings of the index and the topic"
        )
    return d


def scores_from_g(
    g: np.ndarray, n_prompts: np.ndarray, min_prompts: int = 20
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Scores ``[L]`` float32 in [0, 1], the scored mask ``[L]`` bool, and a note (or None).

    ``score_i = (max g − g_i) / (max g − min g)`` over the latents firing on ≥ ``min_prompts``
    prompts, so **1 = most aligned** (closest to the topic). This deviates from the paper's printed
    eq. 2, ``(g − min g)/(max g − min g)``, which would rank the *farthest* latents highest and
    contradicts its own text ("higher scores mean increased relevancy"); METHOD.md step 5.
    Unscored latents get 0. If every scored g is equal, all scored latents get 1 and the note says so.
    """
    g = np.asarray(g, dtype=np.float64)
    n_prompts = np.asarray(n_prompts)
    if g.ndim != 1 or n_prompts.shape != g.shape:
        raise SaealignError(f"g {g.shape} and n_prompts {n_prompts.shape} must be vectors of the same length")
    if not isinstance(min_prompts, (int, np.integer)) or min_prompts < 1:
        raise SaealignError(f"min_prompts must be an integer >= 1, got {min_prompts!r}")
    scored = n_prompts >= min_prompts
    if not scored.any():
        best = int(n_prompts.max()) if n_prompts.size else 0
        raise SaealignError(
            f"no latent fires on >= {min_prompts} reference prompts (best: {best}): build the index over more prompts"
        )
    gs = g[scored]
    if not np.isfinite(gs).all():
        raise SaealignError(
            f"{int((~np.isfinite(gs)).sum())} scored latents have NaN/inf g: the distances or the index are corrupt"
        )
    hi, lo = float(gs.max()), float(gs.min())
    scores = np.zeros(g.shape, dtype=np.float32)
    note = None
    if hi - lo <= _FLAT_RTOL * max(abs(hi), abs(lo)):
        scores[scored] = 1.0
        note = "all scored latents are equally far from the topic: scores are flat"
    else:
        scores[scored] = ((hi - gs) / (hi - lo)).astype(np.float32)
    return scores, scored, note


def score_topic(
    summary: sp.spmatrix | sp.sparray | PreparedSummary,
    distances: np.ndarray,
    min_prompts: int = 20,
    *,
    topic_texts: list[str] | None = None,
    summary_kind: str = "normalized_sum",
    metric: str = "euclidean",
    index_key: str = "",
    sae_key: str = "",
    distance_power: int = 1,
) -> TopicScores:
    """:func:`latent_g` then :func:`scores_from_g`, packaged as :class:`TopicScores`.

    ``summary [P, L]`` (or prepared), ``distances [P]``; the keyword fields are recorded as given.
    ``distance_power=2`` weighs squared distances in eq. 1, as the paper's released code does (the printed
    equation uses ``d``; METHOD.md keeps 1 as the default); it is recorded in ``extra``.
    """
    if distance_power not in (1, 2):
        raise SaealignError(f"distance_power must be 1 (the printed eq. 1) or 2 (the authors' code), got {distance_power}")
    d = np.asarray(distances, dtype=np.float64)
    g, _, n_prompts = latent_g(summary, d * d if distance_power == 2 else d)
    scores, scored, note = scores_from_g(g, n_prompts, min_prompts)
    return TopicScores(
        scores=scores,
        g=g,
        n_prompts=n_prompts,
        scored=scored,
        topic_texts=list(topic_texts or []),
        summary=summary_kind,
        metric=metric,
        min_prompts=int(min_prompts),
        index_key=index_key,
        sae_key=sae_key,
        note=note,
        extra={"distance_power": 2} if distance_power == 2 else {},
    )


def kendall_tau(a: TopicScores | np.ndarray, b: TopicScores | np.ndarray, top: int | None = None) -> float:
    """Kendall's tau-b between two latent rankings, over the latents scored in both.

    Plain arrays count every latent as scored. With ``top``, only the union of each side's ``top``
    best latents is compared (agreement where it matters for steering).
    """
    from scipy.stats import kendalltau

    sa, ma, ta = _ranking(a, top)
    sb, mb, tb = _ranking(b, top)
    if sa.shape != sb.shape:
        raise SaealignError(f"cannot compare rankings over {sa.shape[0]} and {sb.shape[0]} latents: use one SAE")
    keep = ma & mb
    if top is not None:
        sel = np.zeros_like(keep)
        sel[ta + tb] = True
        keep &= sel
    if keep.sum() < 2 or np.ptp(sa[keep]) == 0 or np.ptp(sb[keep]) == 0:
        raise SaealignError(
            f"Kendall tau is undefined over {int(keep.sum())} shared latents with these scores: "
            "need >= 2 latents scored in both, not all tied"
        )
    return float(kendalltau(sa[keep], sb[keep]).statistic)


def _ranking(x: TopicScores | np.ndarray, top: int | None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Scores ``[L]`` float64, scored mask ``[L]``, and the best ``top`` latents (empty if ``top`` is None)."""
    if isinstance(x, TopicScores):
        return x.scores.astype(np.float64), x.scored, x.top(top) if top is not None else []
    s = np.asarray(x, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise SaealignError("score arrays for Kendall tau must be finite [L] vectors")
    best = [int(i) for i in np.argsort(-s, kind="stable")[:top]] if top is not None else []
    return s, np.ones(s.shape, dtype=bool), best
