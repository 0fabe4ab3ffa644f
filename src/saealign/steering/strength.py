"""``strength="auto"``: the strongest steering that keeps the text fluent, found per topic in seconds.

Swap (and Weight) weight the pre-activations by ``scores ** strength`` (:class:`saealign.steering.edits.Steering`):
``strength=1`` is the paper's Swap, ``0`` gives every latent weight 1 (the plain SAE: in ``error`` mode
no edit at all), larger values let only the best-scored latents win. Stronger moves text further
toward the topic and, past some point, breaks fluency. The paper leaves the trade-off to the user;
its constraint C3 says users should not tune parameters. So, per topic:

1. continue a small fixed set of neutral prompts (shipped with the package) unsteered, with fixed
   seeds, and measure the perplexity of those continuations under the unsteered model itself;
2. continue the same prompts with the same seeds steered at every candidate strength (one batch),
   and measure for each (a) the perplexity of the steered continuations under the *unsteered* model
   and (b) their mean min-distance to the topic texts (MiniLM, as the evaluation does);
3. fit the perplexity ratios of all candidates with a non-decreasing (isotonic) curve, which pools
   the noise of short continuations, and keep the strongest candidate whose fitted ratio stays within
   the fluency budget (default +15 %) and moves the text toward the topic at all (distance below the
   unsteered one): stronger steering moves text further toward the topic. If none qualifies, the
   strength is 0: no steering, said so in the choice.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saealign.cache import hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel, load_model
from saealign.reference.embed import min_distances
from saealign.steering.spec import GenerationSpec

if TYPE_CHECKING:
    from saealign.reference.scoring import TopicScores
    from saealign.steering.aligner import Aligner, Generation

NEUTRAL_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "neutral_prompts.txt"
AUTO = "auto"


@dataclass(frozen=True)
class AutoStrengthConfig:
    """How the automatic strength is searched. The defaults take a few seconds on a 2-core CPU."""

    budget: float = 0.15
    """Allowed perplexity increase of steered over unsteered continuations (0.15 = +15 %)."""
    strengths: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    """Candidates (all tried, in one batch)."""
    n_prompts: int = 8
    """Neutral prompts continued per candidate (the first n of the shipped file)."""
    max_new_tokens: int = 16
    top_k: int = 5
    seed: int = 0
    judge: str = "self"
    """Whose perplexity: ``self`` (the aligner's own model, unsteered: no second model to load) or a model
    spec for :func:`saealign.models.load_model` (an independent judge such as ``gemma3-270m``). On the
    defaults both chose the same strength for the medical topic (0.3); Gemma took 2x longer."""

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise SaealignError(f"the fluency budget must be > 0 (e.g. 0.15 for +15 %), got {self.budget}")
        if not self.strengths or any(not s > 0 for s in self.strengths):
            raise SaealignError(f"candidate strengths must be positive numbers, got {self.strengths}")
        if self.n_prompts < 1 or self.max_new_tokens < 1 or self.top_k < 1:
            raise SaealignError("n_prompts, max_new_tokens and top_k must be at least 1")

    def key(self) -> str:
        return hash_json(asdict(self))[:12]


@dataclass
class StrengthChoice:
    """What the search chose and measured (JSON round-trips through :meth:`to_json`/:meth:`from_json`)."""

    strength: float
    """The chosen strength (0 = no candidate fitted the budget: steering is off)."""
    ppl_ratio: float
    """Perplexity of the chosen strength's continuations over the unsteered ones (1.0 at strength 0)."""
    distance: float
    """Mean min-distance of the chosen strength's continuations to the topic texts."""
    base_ppl: float
    base_distance: float
    budget: float
    method: str
    mode: str
    seconds: float
    judge: str = "self"
    """The model whose perplexity was measured."""
    trials: list[dict[str, float]] = field(default_factory=list)
    """One ``{strength, ppl, ppl_ratio, distance}`` per candidate tried."""

    @property
    def gap_closed(self) -> float:
        """Share of the unsteered distance removed (``1 − distance / base_distance``); 0 when unsteered."""
        return 1 - self.distance / self.base_distance if self.base_distance else 0.0

    def describe(self) -> str:
        if self.strength == 0:
            return (f"strength auto -> 0 (no candidate moved toward the topic within +{self.budget:.0%} perplexity: "
                    f"steering off; "
                    f"searched in {self.seconds:.1f} s)")
        return (f"strength auto -> {self.strength:g} ({self.judge} perplexity {self.ppl_ratio - 1:+.1%} of unsteered, budget "
                f"+{self.budget:.0%}; distance to topic {self.base_distance:.3f} -> {self.distance:.3f}; "
                f"searched in {self.seconds:.1f} s)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StrengthChoice:
        return cls(**data)


def neutral_prompts(n: int) -> list[str]:
    """The first ``n`` of the package's neutral prompts (everyday sentence openings, no topic)."""
    prompts = [line.strip() for line in NEUTRAL_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n > len(prompts):
        raise SaealignError(f"the package ships {len(prompts)} neutral prompts; n_prompts={n} is too many")
    return prompts[:n]


@torch.inference_mode()
def continuation_nll(lm: LoadedModel, prompt_ids: Sequence[Sequence[int]], new_ids: Sequence[Sequence[int]],
                     batch: int = 16) -> tuple[float, int]:
    """``(summed NLL in nats, tokens)`` of the ``new_ids`` continuations given ``prompt_ids``, under ``lm``.

    Works on token ids (no re-tokenisation of decoded text), right-padded, the model unsteered.
    """
    total, count = 0.0, 0
    device = next(lm.model.parameters()).device
    for b in range(0, len(prompt_ids), batch):
        rows = [(list(p), list(c)) for p, c in zip(prompt_ids[b : b + batch], new_ids[b : b + batch], strict=True)]
        rows = [(p, c) for p, c in rows if c]
        if not rows:
            continue
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for i, (p, c) in enumerate(rows):
            total += float(nll[i, len(p) - 1 : len(p) + len(c) - 1].sum())
            count += len(c)
    return total, count


class NeutralProbe:
    """The neutral prompts, their ids and the unsteered measurements, shared by every topic."""

    def __init__(self, aligner: Aligner, cfg: AutoStrengthConfig) -> None:
        self.prompts = neutral_prompts(cfg.n_prompts)
        tok: Any = aligner.lm.tokenizer
        self.prompt_ids = [list(tok(p)["input_ids"]) for p in self.prompts]
        self.own = aligner.lm
        self.judge = aligner.lm if cfg.judge == "self" else load_model(cfg.judge)
        plain = GenerationSpec("none", max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k)
        base = aligner.generate(self.prompts, spec=plain, seed=cfg.seed)
        self.base_texts = [g.text for g in base]
        self.base_ppl = self.perplexity(base)

    def perplexity(self, gens: Sequence[Generation]) -> float:
        """Token-weighted perplexity of the continuations ``gens`` (of :attr:`prompts`) under the judge."""
        if self.judge is self.own:  # same tokenizer: score the generated ids themselves
            nll, n = continuation_nll(self.judge, self.prompt_ids, [g.token_ids for g in gens])
            return math.exp(nll / n)
        from saealign.evaluate.metrics import continuation_nll as text_nll
        from saealign.evaluate.metrics import perplexity

        return perplexity(text_nll(self.judge, self.prompts, [g.text for g in gens]))


def isotonic(values: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit of ``values`` (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [mean, size]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, size in blocks for _ in range(int(size))]


def _distance(aligner: Aligner, texts: list[str], topic_embeddings: np.ndarray) -> float:
    assert aligner.embedder is not None
    safe = [t if t.strip() else "." for t in texts]  # an empty continuation still gets a (large) distance
    return float(min_distances(aligner.embedder.embed(safe), topic_embeddings).mean())


def choose_strength(aligner: Aligner, topic: TopicScores, method: str = "swap", mode: str = "error",
                    cfg: AutoStrengthConfig | None = None, steer_prompt: bool = True) -> StrengthChoice:
    """Search the strength for ``topic`` as the module docstring says (no caching: see :meth:`Aligner.auto_strength`)."""
    cfg = cfg or AutoStrengthConfig()
    if aligner.embedder is None:
        raise SaealignError("strength='auto' measures distance to the topic texts and needs an embedder: "
                            "pass embedder= to Aligner, or give a number as the strength")
    if not topic.topic_texts:
        raise SaealignError("strength='auto' needs the topic's texts (these scores carry none): give a number")
    start = time.perf_counter()
    probe = aligner.neutral_probe(cfg)
    topic_emb = aligner.embedder.embed(list(topic.topic_texts))
    base_distance = _distance(aligner, probe.base_texts, topic_emb)
    # Every candidate in ONE batch (rows = candidates x prompts, one strength per row): on a CPU a wide batch
    # costs far less per token than one call per candidate. Equal prompts and seeds give every candidate
    # the same random stream, so candidates differ only by their strength.
    candidates = sorted(set(cfg.strengths))
    n = len(probe.prompts)
    spec = GenerationSpec(method, mode, max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, steer_prompt=steer_prompt)
    gens = aligner.generate(probe.prompts * len(candidates), topic, spec, seed=cfg.seed,
                            strength_per_row=[s for s in candidates for _ in range(n)])
    trials: list[dict[str, float]] = []
    for c, s in enumerate(candidates):
        rows = gens[c * n : (c + 1) * n]
        ppl = probe.perplexity(rows)
        trials.append({"strength": s, "ppl": ppl, "ppl_ratio": ppl / probe.base_ppl,
                       "distance": _distance(aligner, [g.text for g in rows], topic_emb)})
    # A few short continuations make each perplexity noisy (+-20 % here); perplexity grows with the strength,
    # so the ratios are smoothed by a monotone (isotonic) fit over all candidates before the budget is applied.
    fitted = isotonic([t["ppl_ratio"] for t in trials])
    best = (0.0, 1.0, base_distance)  # (strength, ppl ratio, distance); strength 0 = unsteered
    for t, f in zip(trials, fitted, strict=True):
        t["ppl_ratio_fit"] = f
        if f <= 1 + cfg.budget and t["distance"] < base_distance:
            best = (t["strength"], t["ppl_ratio"], t["distance"])  # the strongest within the budget that helps
    return StrengthChoice(strength=best[0], ppl_ratio=best[1], distance=best[2], base_ppl=probe.base_ppl,
                          base_distance=base_distance, budget=cfg.budget, method=method, mode=mode,
                          seconds=time.perf_counter() - start, trials=trials,
                          judge="self" if probe.judge is probe.own else probe.judge.name)


def cache_key(aligner: Aligner, method: str, mode: str, cfg: AutoStrengthConfig) -> str:
    """Where a choice lives in ``TopicScores.extra["auto_strength"]``: it holds for this model, SAE, layer and search."""
    return f"{aligner.lm.key[:8]}-{aligner.sae_key[:8]}-L{aligner.layer}-{method}-{mode}-{cfg.key()}"
