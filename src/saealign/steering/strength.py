"""``strength="auto"``: the strongest steering whose fluency cost stays within a budget, found per topic in seconds.

Stronger steering moves text further toward the topic and, past some point, breaks fluency. The paper
leaves the trade-off to the user; its constraint C3 says users should not tune parameters. So, per topic:

1. continue a small fixed set of neutral prompts (shipped) unsteered, with fixed seeds, and score each
   generated token's negative log-likelihood under the unsteered model itself;
2. continue the same prompts with the same seeds at every candidate strength (one batch), sampled at the temperature
   the user's text will be (1.2 for the default recipe; 1 for greedy requests), the candidates divided by the prompt
   boost (:meth:`AutoStrengthConfig.candidates`);
3. turn each candidate's extra NLL into the perplexity ratio **a reader would see over ``read_tokens``
   tokens** (64, the default continuation): the extra NLL of the probe's second half is a per-token
   rate ``c`` that lasts; what the first half adds beyond it is a one-off cost ``C`` of switching topic.
   Over ``T`` read tokens the ratio is ``exp(c + C / T)``. (Comparing the short probe's per-token
   perplexities directly would charge the one-off cost ``T / probe`` times over);
4. fit ``log ratio = a·s + b·s²`` (a, b >= 0, least squares) through all candidates: smooth and monotone,
   so one noisy candidate cannot veto every stronger one; choose the strength where the fit meets the
   budget (capped at the largest candidate), provided that steering moves the text toward the topic: the
   least-squares slope of the MiniLM distance to the topic texts over *all* candidates (through the unsteered
   distance at 0) is negative. Otherwise the strength is 0: said so. (Judging the direction by the candidates
   below the choice alone read one candidate of 6 short continuations, and that noise turned steering off for
   topics the push does move: law and banking on ``eval steer-bench``.)

Everything is seeded, so the choice is deterministic; it is cached in the topic's
``TopicScores.extra`` and saved with it. Common random numbers (the same seeds for every strength)
keep the comparison between strengths far less noisy than the perplexities themselves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from saealign.cache import hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import min_distances
from saealign.steering.spec import ADDITIVE, STRENGTH_METHODS, STRENGTH_RANGE, GenerationSpec

if TYPE_CHECKING:
    from saealign.reference.embed import TextEmbedder
    from saealign.reference.scoring import TopicScores
    from saealign.steering.generation import Generation

class Aligner(Protocol):
    """What the search needs of :class:`saealign.steering.aligner.Aligner` (which drives this module, so this
    module names it by shape rather than importing it)."""

    lm: LoadedModel
    embedder: TextEmbedder | None
    sae_key: str
    layer: int

    def generate(self, prompts: str | Sequence[str], topic: Any = None, spec: GenerationSpec | None = None,
                 seed: int | Sequence[int] = 0, topic_per_row: Sequence[int] | None = None,
                 strength_per_row: Sequence[float] | None = None) -> list[Generation]: ...

    def neutral_probe(self, cfg: AutoStrengthConfig) -> NeutralProbe: ...

    def topic_embeddings(self, texts: Sequence[str]) -> np.ndarray: ...


NEUTRAL_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "neutral_prompts.txt"

SEARCH_VERSION = 2
"""Part of every cached choice's key: a choice saved by an earlier search (version 1 read the direction from
the candidates below the choice alone) is searched anew rather than reused."""

CANDIDATES: dict[str, tuple[float, ...]] = {
    "swap": (0.5, 1.0, 2.0, 3.0, 5.0),
    "weight": (0.25, 0.5, 1.0, 2.0, 3.0),
    "add": (0.15, 0.3, 0.45, 0.6),
    "swap_add": (0.15, 0.3, 0.45, 0.6),
    "diffmean": (0.15, 0.3, 0.45, 0.6),
}
"""The strengths tried per method, inside :data:`saealign.steering.spec.STRENGTH_RANGE`, for a constant push; a prompt
pushed ``b`` times harder tries these ÷ ``b`` (:meth:`AutoStrengthConfig.candidates`)."""


@dataclass(frozen=True)
class AutoStrengthConfig:
    """How the automatic strength is searched. The defaults take a few seconds on a 2-core CPU."""

    budget: float = 0.5
    """Allowed perplexity increase over ``read_tokens`` tokens, steered over unsteered (0.5 = +50 %), under the
    unsteered model itself. The model judges its own samples far more harshly than an outsider does (its
    unsteered text is what it would have said): on ``eval steer-bench`` a +45-50 % self ratio read as +7-16 %
    under Gemma 3 270M (Swap at 1, add at 0.3), so this budget aims at about +15 % for a reader."""
    read_tokens: int = 64
    """The continuation length the budget speaks of (the default ``max_new_tokens``)."""
    n_prompts: int = 6
    """Neutral prompts continued per candidate (the first n of the shipped file)."""
    max_new_tokens: int = 16
    """Probe length; its two halves separate the lasting cost from the one-off one."""
    top_k: int = 5
    seed: int = 0
    strengths: tuple[float, ...] | None = None
    """Candidates; None = :data:`CANDIDATES` of the method."""
    temperature: float | None = None
    """The steered probes' sampling temperature; None = the spec's own, so the budget speaks of the text the user will
    read (the unsteered probe samples at 1, as unsteered text does by default). For the default recipe (add 0.05 at x4,
    sampled at 1.2) the search at 1.2 chose 0.038-0.095 over the benchmark's 12 topics, at 1 0.052-0.118."""

    def __post_init__(self) -> None:
        if not self.budget > 0 or not math.isfinite(self.budget):
            raise SaealignError(f"the fluency budget must be a finite number > 0 (0.1 = +10 %), got {self.budget}")
        if self.strengths is not None and (not self.strengths or any(not s > 0 for s in self.strengths)):
            raise SaealignError(f"candidate strengths must be positive numbers, got {self.strengths}")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise SaealignError(f"the probe's temperature must be a finite number > 0, got {self.temperature}")
        if self.n_prompts < 1 or self.max_new_tokens < 2 or self.top_k < 1 or self.read_tokens < 1:
            raise SaealignError("n_prompts, top_k and read_tokens must be at least 1, max_new_tokens at least 2")

    def candidates(self, method: str, prompt_boost: float = 1.0) -> tuple[float, ...]:
        """The candidates in the method's range. With a prompt boost ``b`` > 1 the method's own grid is divided by
        ``b``, so the prompt's push spans what a constant push's does (the boost sets the topic in the prompt; a grid
        made for a constant push would try only pushes past the knee: the default recipe's 0.05 at x4 lies below
        :data:`CANDIDATES`' smallest), and only candidates whose boosted prompt push stays in the range are kept."""
        if method not in STRENGTH_METHODS:
            raise SaealignError(f"strength='auto' needs a method that reads a strength ({', '.join(STRENGTH_METHODS)})")
        low, high = STRENGTH_RANGE[method]
        boost = max(1.0, prompt_boost)
        grid = self.strengths or tuple(round(s / boost, 4) for s in CANDIDATES[method])
        chosen = tuple(sorted({s for s in grid if low < s <= high / boost}))
        if not chosen:
            raise SaealignError(f"no candidate strength lies in {method}'s range at prompt boost {boost:g} "
                                f"({low:g}, {high / boost:g}]: {self.strengths}")
        return chosen

    def key(self) -> str:
        return hash_json({**asdict(self), "search": SEARCH_VERSION})[:12]


@dataclass
class StrengthChoice:
    """What the search chose and measured (JSON round-trips through :meth:`to_json`/:meth:`from_json`)."""

    strength: float
    """The chosen strength (0 = nothing within the budget moved the text toward the topic: steering off)."""
    ppl_ratio: float
    """The fitted perplexity ratio over ``read_tokens`` at the chosen strength (1.0 at strength 0)."""
    distance: float
    """Mean min-distance to the topic texts at the chosen strength, on the fitted line (see :func:`distance_slope`)."""
    base_distance: float
    budget: float
    method: str
    mode: str
    seconds: float
    fit: tuple[float, float] = (0.0, 0.0)
    """``(a, b)`` of ``log ratio = a·s + b·s²``."""
    trials: list[dict[str, float]] = field(default_factory=list)
    """One ``{strength, rate, switch, log_ratio, distance}`` per candidate tried."""
    note: str = ""

    @property
    def gap_closed(self) -> float:
        """Share of the unsteered distance removed (``1 − distance / base_distance``); 0 when unsteered."""
        return 1 - self.distance / self.base_distance if self.base_distance else 0.0

    def describe(self) -> str:
        if self.strength == 0:
            return f"strength auto -> 0: {self.note or 'steering off'} (searched in {self.seconds:.1f} s)"
        return (f"strength auto -> {self.strength:.3g} ({self.method}; perplexity {self.ppl_ratio - 1:+.1%} over "
                f"unsteered, budget +{self.budget:.0%}; distance to topic {self.base_distance:.3f} -> "
                f"{self.distance:.3f}; searched in {self.seconds:.1f} s)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StrengthChoice:
        data = dict(data)
        data["fit"] = tuple(data.get("fit", (0.0, 0.0)))
        return cls(**data)


def neutral_prompts(n: int) -> list[str]:
    """The first ``n`` of the package's neutral prompts (everyday sentence openings, no topic)."""
    prompts = [line.strip() for line in NEUTRAL_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n > len(prompts):
        raise SaealignError(f"the package ships {len(prompts)} neutral prompts; n_prompts={n} is too many")
    return prompts[:n]


@torch.inference_mode()
def token_nlls(lm: LoadedModel, prompt_ids: Sequence[Sequence[int]], new_ids: Sequence[Sequence[int]],
               batch: int = 32) -> list[np.ndarray]:
    """Per generated token, its NLL (nats) given the prompt and the tokens before it, under ``lm`` unsteered.

    Works on token ids (no re-tokenisation of decoded text), right-padded.
    """
    device = next(lm.model.parameters()).device
    out: list[np.ndarray] = []
    for b in range(0, len(prompt_ids), batch):
        rows = [(list(p), list(c)) for p, c in zip(prompt_ids[b:b + batch], new_ids[b:b + batch], strict=True)]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for i, (p, c) in enumerate(rows):
            out.append(nll[i, len(p) - 1: len(p) + len(c) - 1].cpu().numpy().astype(np.float64))
    return out


def halves(nlls: Sequence[np.ndarray], length: int) -> tuple[float, float]:
    """Mean per-token NLL of the first and the second half of ``length`` tokens, over rows (early-ended rows
    count what they have; an empty half reads 0)."""
    cut = length // 2
    first = [x[:cut] for x in nlls if len(x[:cut])]
    second = [x[cut:] for x in nlls if len(x[cut:])]
    mean = lambda parts: float(np.concatenate(parts).mean()) if parts else 0.0  # noqa: E731
    return mean(first), mean(second)


def read_log_ratio(base: tuple[float, float], steered: tuple[float, float], length: int, read_tokens: int) -> tuple[
        float, float, float]:
    """``(rate c, one-off cost C, log perplexity ratio over read_tokens)`` from the two halves' mean NLLs."""
    cut = length // 2
    rate = max(0.0, steered[1] - base[1])
    first_extra = (steered[0] - base[0]) * cut
    switch = max(0.0, first_extra - rate * cut)
    return rate, switch, rate + switch / read_tokens


def fit_curve(strengths: Sequence[float], log_ratios: Sequence[float]) -> tuple[float, float]:
    """Non-negative least squares ``log r ≈ a·s + b·s²`` (through 0: no steering, no cost)."""
    from scipy.optimize import nnls

    s = np.asarray(strengths, dtype=float)
    a, b = nnls(np.stack([s, s * s], axis=1), np.asarray(log_ratios, dtype=float))[0]
    return float(a), float(b)


def distance_slope(strengths: Sequence[float], distances: Sequence[float], base_distance: float) -> float:
    """Least-squares slope of ``distance − base_distance`` over strength, through 0 (< 0: steering moves the
    text toward the topic)."""
    s = np.asarray(strengths, dtype=float)
    return float(s @ (np.asarray(distances, dtype=float) - base_distance) / (s @ s))


def solve_budget(a: float, b: float, budget: float, cap: float) -> float:
    """The strength where ``a·s + b·s² = log(1 + budget)``, at most ``cap``."""
    target = math.log1p(budget)
    if b > 1e-12:
        s = (-a + math.sqrt(a * a + 4 * b * target)) / (2 * b)
    elif a > 1e-12:
        s = target / a
    else:
        s = cap
    return min(s, cap)


class NeutralProbe:
    """The neutral prompts, their ids and the unsteered measurements, shared by every topic."""

    def __init__(self, aligner: Aligner, cfg: AutoStrengthConfig) -> None:
        self.prompts = neutral_prompts(cfg.n_prompts)
        tok: Any = aligner.lm.tokenizer
        self.prompt_ids = [list(tok(p)["input_ids"]) for p in self.prompts]
        plain = GenerationSpec("none", max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k)
        base = aligner.generate(self.prompts, spec=plain, seed=cfg.seed)
        self.base_texts = [g.text for g in base]
        self.halves = halves(self.nlls(aligner, base), cfg.max_new_tokens)

    def nlls(self, aligner: Aligner, gens: Sequence[Generation]) -> list[np.ndarray]:
        return token_nlls(aligner.lm, self.prompt_ids * (len(gens) // len(self.prompt_ids)), [g.token_ids for g in gens])


def _distance(aligner: Aligner, texts: list[str], topic_embeddings: np.ndarray) -> float:
    assert aligner.embedder is not None
    safe = [t if t.strip() else "." for t in texts]  # an empty continuation still gets a (large) distance
    return float(min_distances(aligner.embedder.embed(safe), topic_embeddings).mean())


def search_temperature(spec: GenerationSpec, cfg: AutoStrengthConfig) -> float:
    """The temperature the steered probes sample at: the configuration's, else the spec's (1 for greedy text)."""
    return cfg.temperature or (1.0 if spec.greedy else spec.heat)


def choose_strength(aligner: Aligner, topic: TopicScores, spec: GenerationSpec,
                    cfg: AutoStrengthConfig | None = None) -> StrengthChoice:
    """Search the strength of ``spec.method`` for ``topic`` as the module docstring says (no caching: see
    :meth:`Aligner.auto_strength`)."""
    cfg = cfg or AutoStrengthConfig()
    candidates = cfg.candidates(spec.method, spec.boost if spec.method in ADDITIVE else 1.0)
    if aligner.embedder is None:
        raise SaealignError("strength='auto' measures distance to the topic texts and needs an embedder: "
                            "pass embedder= to Aligner, or give a number as the strength")
    if not topic.topic_texts:
        raise SaealignError("strength='auto' needs the topic's texts (these scores carry none): give a number")
    start = time.perf_counter()
    probe = aligner.neutral_probe(cfg)
    topic_emb = aligner.topic_embeddings(topic.topic_texts)
    base_distance = _distance(aligner, probe.base_texts, topic_emb)
    # Every candidate in ONE batch (rows = candidates x prompts, one strength per row); equal prompts and seeds
    # give every candidate the same random stream, so candidates differ only by their strength.
    n = len(probe.prompts)
    search = GenerationSpec(**{**spec.to_json(), "strength": "auto", "max_new_tokens": cfg.max_new_tokens,
                               "top_k": cfg.top_k, "greedy": False, "chat": False,
                               "temperature": search_temperature(spec, cfg),
                               "tune_steps": 0})  # the untuned mix: tuning every candidate would cost minutes
    gens = aligner.generate(probe.prompts * len(candidates), topic, search, seed=cfg.seed,
                            strength_per_row=[s for s in candidates for _ in range(n)])
    all_nlls = probe.nlls(aligner, gens)
    trials: list[dict[str, float]] = []
    for c, s in enumerate(candidates):
        rows = slice(c * n, (c + 1) * n)
        rate, switch, log_ratio = read_log_ratio(probe.halves, halves(all_nlls[rows], cfg.max_new_tokens),
                                                 cfg.max_new_tokens, cfg.read_tokens)
        trials.append({"strength": s, "rate": rate, "switch": switch, "log_ratio": log_ratio,
                       "distance": _distance(aligner, [g.text for g in gens[rows]], topic_emb)})
    a, b = fit_curve(candidates, [t["log_ratio"] for t in trials])
    strength = solve_budget(a, b, cfg.budget, candidates[-1])
    slope = distance_slope(candidates, [t["distance"] for t in trials], base_distance)
    note = ""
    if not slope < 0:
        note = ("no strength moved the text toward the topic (its distance to the topic texts does not fall as the "
                "strength grows): steering off (give more or more specific topic texts, or a number as the strength)")
        strength = 0.0
    distance = base_distance + slope * strength
    ratio = math.exp(a * strength + b * strength * strength)
    return StrengthChoice(strength=round(strength, 4), ppl_ratio=ratio, distance=distance, base_distance=base_distance,
                          budget=cfg.budget, method=spec.method, mode=spec.mode,
                          seconds=time.perf_counter() - start, fit=(a, b), trials=trials, note=note)


def cache_key(aligner: Aligner, spec: GenerationSpec, cfg: AutoStrengthConfig) -> str:
    """Where a choice lives in ``TopicScores.extra["auto_strength"]``: it holds for this model, SAE, layer, the
    spec's steering options and the search configuration."""
    steering = {k: v for k, v in spec.to_json().items()
                if k in ("method", "mode", "steer_prompt", "unscored", "n_latents", "output_scores", "contrast",
                         "output_match", "feedback", "prompt_boost", "companion_push")}
    steering["temperature"] = search_temperature(spec, cfg)
    if spec.method in ADDITIVE and spec.slot:  # only where on, so the choices cached before the slot keep their keys
        steering["slot_push"] = spec.slot
    companions = getattr(aligner, "companions", ())
    if spec.companion_push and companions:  # the choice holds for these companion SAEs, layers and weights only
        steering["companions"] = [f"{c.aligner.sae_key}-L{c.aligner.layer}-w{c.weight:.6g}" for c in companions]
    return f"{aligner.lm.key[:8]}-{aligner.sae_key[:8]}-L{aligner.layer}-{spec.method}-{hash_json(steering)[:8]}-{cfg.key()}"
