"""Generated-text evaluation (the paper's Table 2): methods x modes x layers x seeds, plus the baselines.

For every configuration the same prompts are continued (64 new tokens, top-k 5 sampling, several
seeds) and measured by: distance to held-out topic texts (MiniLM; lower = more on topic), judge
perplexity (independent LM, conditioned on the prompt), contamination (METHOD.md), distinct-2
(repetition) and latents changed per token. Reported as mean ± std over seeds.

:func:`generation_table` is ``saealign eval generation``; :func:`topic_inputs`, :func:`condition_inputs`
and :func:`add_relative` are shared with the frontier (:mod:`saealign.evaluate.frontier`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from saealign.evaluate.conditions import Condition, ConditionInputs, gap_closed, run_conditions
from saealign.evaluate.report import Table, scatter_plot
from saealign.evaluate.topics import TOPICS, split, topic_prompts, topic_texts
from saealign.evaluate.workbench import Workbench
from saealign.steering.aligner import Aligner
from saealign.steering.spec import STRENGTH_METHODS, GenerationSpec

BASELINES = ("prompt", "lora", "full")
PAPER_METHODS = ("none", "sae", "clamp", "swap", "weight")
"""The methods of the paper's Table 2 (the additive ones are measured by ``eval steer-bench``)."""


@dataclass(frozen=True)
class GenerationSetup:
    """What to generate and how."""

    methods: tuple[str, ...] = PAPER_METHODS
    modes: tuple[str, ...] = ("error", "replace")
    seeds: tuple[int, ...] = (0, 1, 2)
    strengths: tuple[float | str, ...] = (1.0,)
    """Swap/Weight strengths: numbers or ``auto``."""
    max_new_tokens: int = 64
    top_k: int = 5

    @property
    def sampling(self) -> GenerationSpec:
        return GenerationSpec("none", strength=1.0, max_new_tokens=self.max_new_tokens, top_k=self.top_k)


@dataclass(frozen=True)
class TextOptions:
    """What every generated-text experiment (``eval generation``, ``eval frontier``) shares."""

    judge: str = "gemma3-270m"
    """The model whose perplexity is reported (an independent LM)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 64
    n_topic: int = 50
    """Topic texts that score the topic (and that the fine-tuning baselines train on)."""
    n_heldout: int = 200
    """Other topic texts that distances are measured against."""
    max_prompts: int | None = None
    """Use only the first N test prompts (``--quick``)."""
    acceptability: bool = False
    """Also judge acceptability with the CoLA classifier."""
    finetune_epochs: int = 3


def setup_conditions(layers: Sequence[int], setup: GenerationSetup) -> list[Condition]:
    """The Table 2 grid: per layer, unsteered then methods x modes x strengths (strength only where a method reads it)."""
    return [Condition(layer=layers[0])] + [  # unsteered text does not depend on the layer: once
        Condition(layer=layer, method=m, mode=mode, strength=s)
        for layer in layers for m in setup.methods if m != "none" for mode in setup.modes
        for s in (setup.strengths if m in STRENGTH_METHODS else (1.0,))
    ]


def baseline_conditions(layer: int, baselines: Sequence[str]) -> list[Condition]:
    out = [Condition(kind="prompt", layer=layer)] if "prompt" in baselines else []
    return out + [Condition(kind="finetune", layer=layer, finetune=m) for m in ("lora", "full") if m in baselines]


def evaluate_generations(
    aligner_for: Callable[[int], Aligner],
    layers: Sequence[int],
    inputs: ConditionInputs,
    setup: GenerationSetup = GenerationSetup(),
    baselines: Sequence[Condition] = (),
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (unsteered, then one per layer x method x mode x strength, then ``baselines``) and the reference figures.

    ``aligner_for(layer)`` is called once per layer, when first needed.
    """
    conditions = setup_conditions(layers, setup) + list(baselines)
    return run_conditions(conditions, aligner_for, inputs, progress)


def topic_inputs(data: Path, topic: str, n_topic: int, n_heldout: int, max_prompts: int | None = None
                 ) -> tuple[list[str], list[str], list[str]]:
    """``(topic texts, held-out texts, prompts)`` of one evaluation topic; errors before any model loads."""
    texts, heldout = split(topic_texts(data, topic), n_topic, n_heldout)
    return texts, heldout, topic_prompts(data, topic)[: max_prompts or None]


def condition_inputs(bench: Workbench, layer: int, topic: str, baselines: Sequence[str], opts: TextOptions
                     ) -> ConditionInputs:
    """The prompts, texts, judge and fine-tuned models one topic's conditions share."""
    texts, heldout, prompts = topic_inputs(bench.data, topic, opts.n_topic, opts.n_heldout, opts.max_prompts)
    sampling = GenerationSpec("none", strength=1.0, max_new_tokens=opts.max_new_tokens)
    inputs = ConditionInputs(prompts, texts, heldout, bench.model(opts.judge), bench.embedder(layer), opts.seeds,
                             sampling, instruction=TOPICS[topic].instruction,
                             acceptability=bench.acceptability() if opts.acceptability else None)
    for method in ("lora", "full"):
        if method in baselines:
            base = bench.aligner(layer)
            tuned = bench.finetuned(base, texts, method, opts.finetune_epochs, label=topic)
            inputs.finetuned[method] = Aligner(tuned.lm, base.sae, layer)
    return inputs


def add_relative(rows: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """``gap_closed`` (share of the none -> real-topic-text distance gap) and ``ppl_ratio`` vs unsteered."""
    none = next(r for r in rows if r["kind"] == "steer" and r["method"] == "none")
    for r in rows:
        r["gap_closed"] = gap_closed(r["distance"], none["distance"], reference["real_topic_text_distance"])
        r["ppl_ratio"] = r["ppl"] / none["ppl"]


def generation_table(bench: Workbench, layers: tuple[int, ...], methods: tuple[str, ...], modes: tuple[str, ...],
                     strengths: tuple[float | str, ...], baselines: tuple[str, ...], opts: TextOptions,
                     topic: str = "medical") -> Table:
    """Table 2 on ``topic``: ``generation`` rows, the reference figures, the set-up and fine-tuning times."""
    setup = GenerationSetup(methods=methods, modes=modes, seeds=opts.seeds, strengths=strengths,
                            max_new_tokens=opts.max_new_tokens)
    inputs = condition_inputs(bench, layers[-1], topic, baselines, opts)
    rows, reference = evaluate_generations(bench.aligner, layers, inputs, setup,
                                           baseline_conditions(layers[-1], baselines))
    add_relative(rows, reference)
    cols = ["label", "distance", "gap_closed", "ppl", "ppl_ratio", "acceptable", "contamination", "distinct2",
            "changed", "strength_used"]
    real = reference["real_topic_text_distance"]
    note = (f"distance: mean min MiniLM distance to {len(inputs.heldout_texts)} held-out {topic} texts (real {topic} "
            f"text: {real:.3f}); gap_closed: share of the distance between unsteered and real topic text removed; "
            f"ppl: judge perplexity ({inputs.judge.name}); acceptable: CoLA classifier.")
    title = (f"Generated text ({topic}): {len(inputs.prompts)} prompts, {opts.max_new_tokens} tokens, top-k 5, "
             f"seeds {','.join(map(str, opts.seeds))}")
    plot = partial(scatter_plot, rows=rows, x="ppl", y="distance", label="label",
                   title=f"{topic}: topic distance vs judge perplexity", hline=real, hline_label=f"real {topic} text")
    return Table("generation", title, rows, [c for c in cols if c in rows[0]], note,
                 {"reference": reference, "setup": asdict(setup), "timings": bench.fine_tune_times([topic])},
                 plots={"generation.png": plot})
