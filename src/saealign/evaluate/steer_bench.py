"""``saealign eval steer-bench``: how well each steering method moves text to a topic, against prompting.

For every topic of :mod:`saealign.evaluate.bench_topics` (12 by default, in groups of 4 from one dataset
each), every condition continues the same neutral openers (shipped, none of them in the strength
search's probe) with the same seeds, and is measured by

- **hit rate**: the share of continuations the group's classifier (:mod:`saealign.evaluate.topic_classifier`,
  trained on held-out texts that steering never sees) assigns to the steered topic (chance: 1 / group size);
- **perplexity ratio**: the judge's (Gemma 3 270M) token-weighted perplexity of the continuations
  given the opener alone (not the instruction: every condition is read the same way), over the
  unsteered condition's, per topic, then the geometric mean over topics;
- **distinct-2** (repetition) over unsteered's, and MiniLM distance to the topic's texts.

A condition is a label, a :class:`GenerationSpec`, and whether the prompt carries an instruction
naming the topic (prompting, the strongest simple peer). Everything is seeded: one command, one table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saealign.evaluate.bench_topics import BenchTopic
from saealign.evaluate.metrics import continuation_nll, distinct_n, topic_distance
from saealign.evaluate.ppl_interval import ppl_interval_columns
from saealign.evaluate.topic_classifier import TopicClassifier
from saealign.models import LoadedModel
from saealign.reference.scoring import TopicScores
from saealign.steering.aligner import Aligner
from saealign.steering.generation import Generation
from saealign.steering.slot import SLOT_TEMPLATE
from saealign.steering.spec import ADDITIVE, LATENT_DIRECTIONS, GenerationSpec

OPENERS = Path(__file__).resolve().parent.parent / "data" / "bench_openers.txt"
INSTRUCTION = "The following text is about {title}.\n\n"


EXAMPLES_IN_PROMPT = 4
"""How many of a topic's alignment texts the few-shot peer puts before the opener (the first ones, blank-line separated)."""


@dataclass(frozen=True)
class BenchCondition:
    label: str
    spec: GenerationSpec
    prompting: bool = False
    """An instruction naming the topic before the opener (:data:`INSTRUCTION`)."""
    examples: int = 0
    """This many of the topic's alignment texts before the opener: few-shot prompting, the peer that reads what
    saealign reads (example texts, no title)."""
    slot_template: bool = False
    """The concept slot's template before everything, its placeholder unpushed (:mod:`saealign.steering.slot`): with
    ``method="none"``, the control that says what the template alone does to the text."""

    def prefix(self, topic: BenchTopic) -> str:
        """What this condition puts before every opener of ``topic``."""
        shots = "".join(f"{text}\n\n" for text in topic.align[:self.examples])
        return ((SLOT_TEMPLATE if self.slot_template else "") + shots
                + (INSTRUCTION.format(title=topic.title) if self.prompting else ""))


def shared_by_topics(cond: BenchCondition) -> bool:
    """Whether a condition's continuations are the same for every topic (no push, nothing of the topic before the
    opener): generated and judged once, then classified within each topic's group (it used to be generated and judged
    once per topic)."""
    return cond.spec.method == "none" and not cond.prompting and not cond.examples


def unsteered(cond: BenchCondition) -> bool:
    """Whether ``cond`` is the unsteered row, the denominator of every ratio (sampled on the unsteered seeds)."""
    return shared_by_topics(cond) and not cond.slot_template


@dataclass(frozen=True)
class BenchConfig:
    n_openers: int = 16
    seeds: tuple[int, ...] = (0, 1)
    max_new_tokens: int = 48
    top_k: int = 5
    batch: int = 64
    unsteered_seeds: tuple[int, ...] | None = None
    """The seeds the unsteered row is sampled on (None: ``seeds``). That row is one sample in the denominator of every
    topic's perplexity ratio, so its draw moves all the ratios of a run together (about ± 6 % between 4-seed blocks,
    docs/results.md, run 12); sampled on more seeds it steadies every ratio, at a twelfth of a steered row's cost per
    seed (it is generated once for all topics)."""

    def seeds_of(self, cond: BenchCondition) -> tuple[int, ...]:
        """The seeds ``cond`` is sampled on: :attr:`unsteered_seeds` for the unsteered row, else :attr:`seeds`."""
        return (self.unsteered_seeds or self.seeds) if unsteered(cond) else self.seeds


def bench_openers(n: int) -> list[str]:
    lines = [x.strip() for x in OPENERS.read_text(encoding="utf-8").splitlines() if x.strip()]
    return lines[:n]


def condition_name(spec: GenerationSpec) -> str:
    """``"add 0.2 prompt x4"``: the method, its strength, the prompt boost where it is not 1, the companion push
    where the spec names one (``one layer`` for 0; none named = the aligner's default), the tuning steps where the
    mix is tuned (``tuned 12``), the slot push and the sampling temperature where it is not 1 (``T1.2``)."""
    strength = spec.strength if isinstance(spec.strength, str) else f"{spec.strength:g}"
    boost = f" prompt x{spec.boost:g}" if spec.method in ADDITIVE and spec.boost != 1 else ""
    companion = ""
    if spec.method in ADDITIVE and spec.companion_push is not None:
        companion = " one layer" if spec.companion_push == 0 else f" companion x{spec.companion_push:.3g}"
    tuned = f" tuned {spec.tune_steps}" if spec.tune_steps else ""
    slot = f" slot {spec.slot:g}" if spec.method in ADDITIVE and spec.slot else ""
    hotter = f" T{spec.temperature:g}" if spec.temperature != 1 and not spec.greedy else ""
    return f"{spec.method} {strength}{boost}{companion}{tuned}{slot}{hotter}"


TUNED_ROW_STEPS = 12
"""The tuned mix's row: the default with its latent mix tuned this many steps (:mod:`saealign.steering.tuning`)."""

PREVIOUS_DEFAULT = GenerationSpec(method="add", strength=0.15, prompt_boost=1.0, slot_push=0.5, temperature=1.0)
"""The default before run 15 (docs/results.md, runs 13-14): a harder constant push with the slot at 0.5, sampled at 1.
Steered harder than today's (0.90 against 0.81 hit rate on seeds 36-47) and repeated itself (0.86x distinct-2); a row of
its own so every run can place today's default against it."""

NEIGHBOUR_STEP = 0.025
"""The strength step of the default's neighbour rows: about 4-6 points of hit rate apart near the default (run 8)."""


def default_conditions(default: GenerationSpec | None = None) -> list[BenchCondition]:
    """none, prompting, prompting + the default, the default, few-shot prompting (:data:`EXAMPLES_IN_PROMPT` topic texts
    before the opener) alone and with the default, the default's neighbours (strength ± :data:`NEIGHBOUR_STEP`, the
    constant push at a boosted default's prompt push, the default at temperature 1 where it samples hotter, the push
    without the slot and the slot's template alone, the main layer alone where the default has a companion push, auto,
    the direction without the activation contrast and without the output match, the topic feedback, the same push along
    the SAE-free difference of means and along the tuned mix), the previous default (:data:`PREVIOUS_DEFAULT`), the
    paper's Swap, and the hybrid swap_add. ``--rows`` picks any of them by name."""
    default = default or GenerationSpec()
    out = [BenchCondition("none", GenerationSpec(method="none")),
           BenchCondition("prompting", GenerationSpec(method="none"), prompting=True),
           BenchCondition("prompting + default", default, prompting=True),
           BenchCondition(f"default ({condition_name(default)})", default),
           BenchCondition("examples in prompt", GenerationSpec(method="none"), examples=EXAMPLES_IN_PROMPT),
           BenchCondition("examples in prompt + default", default, examples=EXAMPLES_IN_PROMPT)]
    if default.method in ADDITIVE and not default.is_auto:
        s = float(default.strength)  # type: ignore[arg-type]
        near = [replace(default, strength=round(x, 4)) for x in (s - NEIGHBOUR_STEP, s + NEIGHBOUR_STEP) if x > 0]
        out += [BenchCondition(condition_name(spec), spec) for spec in near]
        if default.boost != 1:  # the constant push at the default's prompt push: what the lighter push on new tokens buys
            flat = replace(default, strength=round(s * default.boost, 4), prompt_boost=1.0)
            out += [BenchCondition(f"{condition_name(flat)} constant push", flat)]
        if default.heat != 1 and not default.greedy:  # the same push sampled at the model's own temperature (run 14b)
            cool = replace(default, temperature=1.0)
            out += [BenchCondition(condition_name(cool), cool)]
        if default.slot:  # the same push without the slot, and the slot's template alone (docs/results.md, run 13)
            plain = replace(default, slot_push=0.0)
            out += [BenchCondition(condition_name(plain), plain),
                    BenchCondition("slot template alone", GenerationSpec(method="none"), slot_template=True)]
        if default.companion_push != 0:  # the same push at the main layer alone (docs/results.md, run 7)
            alone = replace(default, companion_push=0.0)
            out += [BenchCondition(condition_name(alone), alone)]
        auto = replace(default, strength="auto")
        out += [BenchCondition(condition_name(auto), auto),
                BenchCondition(f"{condition_name(default)} without contrast", replace(default, contrast=False))]
        if default.output_match:
            out += [BenchCondition(f"{condition_name(default)} without output match",
                                   replace(default, output_match=False))]
        if not default.feedback:
            faded = replace(default, feedback=True, strength=None, prompt_boost=None)  # the feedback's own defaults
            out += [BenchCondition(f"{condition_name(faded)} with feedback", faded)]
        if default.method in LATENT_DIRECTIONS:  # the same push along the SAE-free difference of means
            control = replace(default, method="diffmean", tune_steps=0)
            out += [BenchCondition(condition_name(control), control)]
        if default.method == "add" and not default.tune_steps:  # the same push along the tuned mix (run 11)
            tuned = replace(default, tune_steps=TUNED_ROW_STEPS)
            out += [BenchCondition(condition_name(tuned), tuned)]
    if default != PREVIOUS_DEFAULT:
        out += [BenchCondition(f"previous default ({condition_name(PREVIOUS_DEFAULT)})", PREVIOUS_DEFAULT)]
    out += [BenchCondition("swap 1", GenerationSpec(method="swap", strength=1.0)),
            BenchCondition("swap_add 0.3", GenerationSpec(method="swap_add", strength=0.3))]
    return out


@dataclass
class Cell:
    """One condition on one topic (all openers x seeds)."""

    condition: str
    topic: str
    group: str
    hit_rate: float
    hit_rate_per_seed: list[float]
    nll: float
    tokens: int
    distinct2: float
    distance: float
    strength: float
    samples: list[str] = field(default_factory=list)
    nll_per_text: list[float] = field(default_factory=list)
    """Each continuation's judge NLL, in the benchmark's order (seeds outer, openers inner): the ratio's interval."""
    tokens_per_text: list[int] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def _generate(aligner: Aligner, cond: BenchCondition, topics: list[BenchTopic], scores: list[TopicScores],
              openers: list[str], cfg: BenchConfig, bar: Any) -> list[list[Generation]]:
    """Per topic, the generations of every opener x seed (rows of several topics share a batch; a condition
    :func:`shared_by_topics` is generated once and the same list given to every topic)."""
    spec = GenerationSpec(**{**cond.spec.to_json(), "max_new_tokens": cfg.max_new_tokens, "top_k": cfg.top_k})
    seeds = cfg.seeds_of(cond)
    shared = shared_by_topics(cond)
    rows = [(t, o, s) for t in range(1 if shared else len(topics)) for s in seeds for o in range(len(openers))]
    out: list[list[Generation]] = [[] for _ in topics]
    for b in range(0, len(rows), cfg.batch):
        chunk = rows[b:b + cfg.batch]
        prompts = [cond.prefix(topics[t]) + openers[o] for t, o, _ in chunk]
        if spec.method == "none":
            gens = aligner.generate(prompts, None, spec, seed=[s for _, _, s in chunk])
        else:
            used = sorted({t for t, _, _ in chunk})
            gens = aligner.generate(prompts, [scores[t] for t in used], spec, seed=[s for _, _, s in chunk],
                                    topic_per_row=[used.index(t) for t, _, _ in chunk])
        for (t, _, _), g in zip(chunk, gens, strict=True):
            out[t].append(g)
        bar.update(len(chunk))
    return [out[0] for _ in topics] if shared else out


def run_steer_bench(aligner: Aligner, judge: LoadedModel, topics: list[BenchTopic],
                    conditions: Sequence[BenchCondition], cfg: BenchConfig | None = None,
                    classifier: TopicClassifier | None = None,
                    log: Callable[[str], None] = print,
                    on_condition: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Run every condition on every topic; return ``{"cells": [...], "rows": [...], "classifier": {...}, ...}``.

    ``on_condition`` receives the cells measured so far after each condition (to save partial results of a
    long run)."""
    cfg = cfg or BenchConfig()
    assert aligner.embedder is not None
    openers = bench_openers(cfg.n_openers)
    start = time.perf_counter()
    scores = [aligner.topic(t.align) for t in topics]
    log(f"scored {len(topics)} topics in {time.perf_counter() - start:.1f} s")
    classifier = classifier or TopicClassifier(aligner.embedder, topics)
    log("classifier accuracy on held-out texts: " +
        ", ".join(f"{g} {m.accuracy:.2f}" for g, m in classifier.groups.items()))
    topic_emb = [aligner.embedder.embed(t.align) for t in topics]
    cells: list[Cell] = []
    timings: dict[str, float] = {}
    total = sum((1 if shared_by_topics(c) else len(topics)) * len(openers) * len(cfg.seeds_of(c)) for c in conditions)
    bar = tqdm(total=total, desc="steer-bench", unit="gen")
    for cond in conditions:
        t0 = time.perf_counter()
        per_topic = _generate(aligner, cond, topics, scores, openers, cfg, bar)
        seeds = cfg.seeds_of(cond)
        judged = [o for _ in seeds for o in openers]
        shared_nll = continuation_nll(judge, judged, [g.text for g in per_topic[0]]) if shared_by_topics(cond) else None
        for topic, gens, emb in zip(topics, per_topic, topic_emb, strict=True):
            texts = [g.text for g in gens]
            nll = shared_nll or continuation_nll(judge, judged, texts)
            predicted = classifier.predict(texts, topic.group)
            hits = np.array([p == topic.name for p in predicted], dtype=float)
            per_seed = [float(h.mean()) for h in np.split(hits, len(seeds))]
            cells.append(Cell(cond.label, topic.name, topic.group, float(hits.mean()), per_seed,
                              sum(x for x, _ in nll), sum(c for _, c in nll), _distinct2(texts, len(openers) * len(cfg.seeds)),
                              float(topic_distance(aligner.embedder, texts, emb).mean()),
                              float(np.mean([g.strength for g in gens])), texts[:3],
                              [x for x, _ in nll], [c for _, c in nll]))
        timings[cond.label] = time.perf_counter() - t0
        if on_condition is not None:
            on_condition([c.__dict__ | {"ppl": c.ppl} for c in cells])
    bar.close()
    rows = summarise(cells, [c.label for c in conditions], len(openers))
    auto = {t.name: s.extra.get("auto_strength", {}) for t, s in zip(topics, scores, strict=True)}
    return {"cells": [c.__dict__ | {"ppl": c.ppl} for c in cells], "rows": rows, "timings_s": timings,
            "classifier": {g: m.accuracy for g, m in classifier.groups.items()}, "auto_strength": auto,
            "config": cfg.__dict__, "conditions": [{"label": c.label, "prompting": c.prompting, "spec": c.spec.to_json()}
                                                   | ({"examples": c.examples} if c.examples else {})
                                                   | ({"slot_template": True} if c.slot_template else {})
                                                   for c in conditions]}


def _distinct2(texts: list[str], sample: int) -> float:
    """Distinct-2 read over samples of the steered rows' size: ``texts`` in chunks of ``sample`` (whole chunks only),
    averaged. Distinct-2 falls as a sample grows (more bigrams repeat), so an unsteered row sampled on more seeds
    (:attr:`BenchConfig.unsteered_seeds`) would otherwise read less diverse than it is, and every ratio to it high."""
    if len(texts) < 2 * sample:
        return distinct_n(texts, 2)
    return float(np.mean([distinct_n(texts[i:i + sample], 2) for i in range(0, len(texts) - sample + 1, sample)]))


def summarise(cells: list[Cell], order: list[str], n_openers: int | None = None) -> list[dict[str, Any]]:
    """One row per condition: mean hit rate (and its spread over seeds), ppl and distinct-2 relative to ``none``; with
    ``n_openers`` and per-continuation NLLs also the perplexity ratio's 95 % bootstrap interval
    (:mod:`saealign.evaluate.ppl_interval`)."""
    base = {c.topic: c for c in cells if c.condition == "none"}
    rows = []
    for label in order:
        mine = [c for c in cells if c.condition == label]
        if not mine:
            continue
        ratios = [c.ppl / base[c.topic].ppl for c in mine if c.topic in base]
        d2 = [c.distinct2 / base[c.topic].distinct2 for c in mine if c.topic in base and base[c.topic].distinct2]
        seeds = np.array([c.hit_rate_per_seed for c in mine]).mean(axis=0)
        rows.append({
            "condition": label,
            "hit_rate": float(np.mean([c.hit_rate for c in mine])),
            "hit_rate_seed_std": float(np.std(seeds)),
            "ppl_ratio": float(np.exp(np.mean(np.log(ratios)))) if ratios else float("nan"),
            "distinct2_ratio": float(np.mean(d2)) if d2 else float("nan"),
            "distance": float(np.mean([c.distance for c in mine])),
            "strength": float(np.mean([c.strength for c in mine])),
            "topics_hit_at_least_half": int(sum(c.hit_rate >= 0.5 for c in mine)),
        } | ppl_interval_columns([(c.nll_per_text, c.tokens_per_text) for c in mine],
                                 [(base[c.topic].nll_per_text, base[c.topic].tokens_per_text) for c in mine
                                  if c.topic in base], n_openers))
    return rows
