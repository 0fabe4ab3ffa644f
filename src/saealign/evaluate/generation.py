"""Generated-text evaluation (the paper's Table 2): methods x modes x layers x seeds.

For every configuration the same prompts are continued (64 new tokens, top-k 5 sampling, several
seeds) and measured by: distance to held-out topic texts (MiniLM; lower = more on topic), judge
perplexity (independent LM, conditioned on the prompt), contamination (METHOD.md), distinct-2
(repetition) and latents changed per token. Reported as mean ± std over seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saealign.evaluate.conditions import Condition, ConditionInputs, run_conditions
from saealign.models import LoadedModel
from saealign.reference.embed import TextEmbedder
from saealign.steering.aligner import Aligner


@dataclass(frozen=True)
class GenerationSetup:
    """What to generate and how."""

    methods: tuple[str, ...] = ("none", "sae", "clamp", "swap", "weight")
    modes: tuple[str, ...] = ("error", "replace")
    seeds: tuple[int, ...] = (0, 1, 2)
    strengths: tuple[float | str, ...] = (1.0,)
    """Swap/Weight strengths: numbers or ``auto``."""
    max_new_tokens: int = 64
    top_k: int = 5


def setup_conditions(layers: Sequence[int], setup: GenerationSetup) -> list[Condition]:
    """The Table 2 grid: per layer, unsteered then methods x modes x strengths (strength only for Swap/Weight)."""
    return [Condition(layer=layers[0])] + [  # unsteered text does not depend on the layer: once
        Condition(layer=layer, method=m, mode=mode, strength=s)
        for layer in layers for m in setup.methods if m != "none" for mode in setup.modes
        for s in (setup.strengths if m in ("swap", "weight") else (1.0,))
    ]


def evaluate_generations(
    aligners: Mapping[int, Callable[[], Aligner]],
    prompts: list[str],
    topic_texts: list[str],
    heldout_texts: list[str],
    judge: LoadedModel,
    embedder: TextEmbedder,
    setup: GenerationSetup = GenerationSetup(),
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (unsteered, then one per layer x method x mode x strength) and the reference figures.

    ``aligners``: layer -> a function building that layer's Aligner (built once, when first needed).
    """
    layers = list(aligners)
    conditions = setup_conditions(layers, setup)
    inputs = ConditionInputs(prompts, topic_texts, heldout_texts, judge, embedder, setup.seeds,
                             setup.max_new_tokens, setup.top_k)
    return run_conditions(conditions, lambda layer: aligners[layer](), inputs, progress)
