"""Generated-text conditions compared on one footing: steering, prompting and fine-tuning.

A :class:`Condition` says how continuations are produced (the unsteered model, an SAE method at a
layer and strength, the unsteered model behind a topic instruction, or a fine-tuned copy of the
model); :func:`run_conditions` continues the same prompts with the same seeds under every condition
and measures each the same way:

- ``distance``: mean min MiniLM distance to held-out topic texts (lower = more on topic);
- ``ppl``: judge perplexity of the continuation given the *original* prompt (an independent LM);
- ``contamination`` (every condition: the continuation is read through the SAE against the topic),
  ``distinct2`` (repetition), ``changed`` (latents edited per token; 0 without steering);
- ``acceptable``: share judged acceptable by the CoLA classifier, when one is given.

Rows carry mean and std over seeds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saealign.errors import SaealignError
from saealign.evaluate.metrics import continuation_nll, distinct_n, perplexity, topic_distance
from saealign.models import LoadedModel
from saealign.reference.embed import TextEmbedder
from saealign.steering.aligner import Aligner, Generation
from saealign.steering.spec import STRENGTH_METHODS, GenerationSpec

KINDS = ("steer", "prompt", "finetune")


@dataclass(frozen=True)
class Condition:
    """One way to produce continuations."""

    kind: str = "steer"
    """``steer`` (an SAE method), ``prompt`` (an instruction before the prompt) or ``finetune``."""
    layer: int = 0
    method: str = "none"
    mode: str = "error"
    strength: float | str = 1.0
    """A number or ``auto`` (Swap/Weight)."""
    finetune: str = ""
    """``full`` or ``lora`` for the fine-tuning baseline."""
    steer_prompt: bool = True
    """False: steer only the positions that predict new tokens (an option beyond the paper)."""

    @property
    def label(self) -> str:
        if self.kind == "prompt":
            return "prompting"
        if self.kind == "finetune":
            return f"FT ({self.finetune})"
        if self.method == "none":
            return "none"
        if self.method not in STRENGTH_METHODS or self.strength == 1.0:
            s = ""
        else:
            s = f" {self.strength}" if isinstance(self.strength, str) else f" x{self.strength:g}"
        return f"L{self.layer} {self.method}/{self.mode}{s}" + ("" if self.steer_prompt else " gen-only")

    @property
    def uses_strength(self) -> bool:
        return self.kind == "steer" and self.method in STRENGTH_METHODS

    def spec(self, sampling: GenerationSpec) -> GenerationSpec:
        """``sampling`` (what every condition shares) with this condition's steering; baselines are unsteered."""
        if self.kind != "steer":
            return replace(sampling, method="none", strength=1.0)
        return replace(sampling, method=self.method, mode=self.mode, strength=self.strength,
                       steer_prompt=self.steer_prompt)


@dataclass
class ConditionInputs:
    """Everything the conditions share."""

    prompts: list[str]
    topic_texts: list[str]
    heldout_texts: list[str]
    judge: LoadedModel
    embedder: TextEmbedder
    seeds: tuple[int, ...] = (0, 1, 2)
    sampling: GenerationSpec = GenerationSpec("none", strength=1.0)
    """Length and sampling of every continuation (each condition sets the steering: :meth:`Condition.spec`)."""
    instruction: str = ""
    """Prompting baseline: put before each prompt, e.g. "Write about medicine and health. "."""
    finetuned: dict[str, Aligner] = field(default_factory=dict)
    """``full``/``lora`` -> an Aligner over the fine-tuned model (built by the caller, timed there)."""
    acceptability: Callable[[list[str]], float] | None = None
    """Share of texts judged acceptable (the CoLA classifier), or None to skip the metric."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(statistics.fmean(values)), float(statistics.pstdev(values)) if len(values) > 1 else 0.0


def _generate(cond: Condition, aligner: Aligner, topic: Any, inputs: ConditionInputs, seed: int) -> list[Generation]:
    # The baselines are generated unsteered but with the topic given, so their contamination is read
    # the same way as the steered rows' (method "none" records without editing).
    spec = cond.spec(inputs.sampling)
    if cond.kind == "prompt":
        # measured as a continuation of the original prompt (what a reader sees), generated behind the instruction
        gens = aligner.generate([inputs.instruction + p for p in inputs.prompts], topic, spec, seed=seed)
        for g, p in zip(gens, inputs.prompts, strict=True):
            g.prompt = p
        return gens
    if cond.kind == "finetune":
        if cond.finetune not in inputs.finetuned:
            raise SaealignError(f"no fine-tuned model for the {cond.finetune!r} baseline: fine-tune one first")
        return inputs.finetuned[cond.finetune].generate(inputs.prompts, topic, spec, seed=seed)
    return aligner.generate(inputs.prompts, topic, spec, seed=seed)


def run_conditions(
    conditions: Sequence[Condition],
    aligner_for: Callable[[int], Aligner],
    inputs: ConditionInputs,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per condition (in order) and the reference figures (real topic text distance, samples).

    ``aligner_for(layer)`` is called once per layer, in the order layers first appear.
    """
    heldout_emb = inputs.embedder.embed(inputs.heldout_texts)
    reference: dict[str, Any] = {
        "real_topic_text_distance": float(np.mean(topic_distance(inputs.embedder, inputs.topic_texts, heldout_emb))),
        "heldout_texts": len(inputs.heldout_texts),
        "topic_texts": len(inputs.topic_texts),
    }
    samples: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    aligners: dict[int, tuple[Aligner, Any]] = {}
    for cond in tqdm(conditions, desc="conditions", disable=not progress):
        if cond.layer not in aligners:
            aligner = aligner_for(cond.layer)
            aligners[cond.layer] = (aligner, aligner.topic(inputs.topic_texts))
        aligner, topic = aligners[cond.layer]
        metrics: dict[str, list[float]] = {k: [] for k in ("distance", "ppl", "contamination", "distinct2", "changed")}
        if inputs.acceptability is not None:
            metrics["acceptable"] = []
        strengths: list[float] = []
        start = time.perf_counter()
        for seed in inputs.seeds:
            gens = _generate(cond, aligner, topic, inputs, seed)
            texts = [g.text for g in gens]
            metrics["distance"].append(float(np.mean(topic_distance(inputs.embedder, texts, heldout_emb))))
            metrics["ppl"].append(perplexity(continuation_nll(inputs.judge, inputs.prompts, texts)))
            metrics["contamination"].append(float(np.mean([g.contamination or 0.0 for g in gens])))
            metrics["distinct2"].append(distinct_n(texts, 2))
            metrics["changed"].append(float(np.mean([np.mean(g.n_changed) for g in gens])))
            if inputs.acceptability is not None:
                metrics["acceptable"].append(inputs.acceptability(texts))
            strengths += [g.strength for g in gens]
            if seed == inputs.seeds[0]:
                samples[_sample_key(cond)] = [(g.prompt, g.text) for g in gens[:3]]
        row: dict[str, Any] = {"label": cond.label, "kind": cond.kind, "layer": cond.layer, "method": cond.method,
                               "mode": cond.mode, "strength": cond.strength,
                               "strength_used": float(np.mean(strengths)) if cond.uses_strength else None,
                               "seconds": time.perf_counter() - start}
        for key, values in metrics.items():
            row[key], row[f"{key}_std"] = _mean_std(values)
        rows.append(row)
    reference["samples"] = samples
    return rows, reference


def _sample_key(cond: Condition) -> str:
    if cond.kind != "steer":
        return cond.label
    s = cond.strength if isinstance(cond.strength, str) else f"{cond.strength:g}"
    return f"L{cond.layer} {cond.method} {cond.mode} s{s}" + ("" if cond.steer_prompt else " gen-only")


def gap_closed(distance: float, none_distance: float, real_distance: float) -> float:
    """Share of the gap between unsteered text and real topic text that a condition closes (1 = as close as real).

    Exactly 0 for a condition as far as unsteered text (the unsteered row itself); NaN when there is no
    gap (unsteered text already as close to the held-out texts as real topic text), where a share is
    meaningless and its sign would flip.
    """
    if distance == none_distance:
        return 0.0
    gap = none_distance - real_distance
    return (none_distance - distance) / gap if gap > 0 else float("nan")
