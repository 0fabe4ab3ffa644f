"""Topic distance vs judge perplexity, per topic (``saealign eval frontier``): where each way of steering lands.

Per topic: none, Swap at fixed strengths, Swap ``auto``, Clamp, Swap ``auto`` on generated positions
only, and the prompting and fine-tuning baselines, all on the same prompts and seeds
(:mod:`saealign.evaluate.conditions`). The summary says whether ``auto`` closes at least half of the
distance gap between unsteered and real topic text within +15 % judge perplexity.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from saealign.evaluate.conditions import Condition, run_conditions
from saealign.evaluate.generation import TextOptions, add_relative, baseline_conditions, condition_inputs
from saealign.evaluate.report import Table, scatter_plot
from saealign.evaluate.workbench import Workbench


def frontier_conditions(layer: int, strengths: tuple[float, ...], baselines: tuple[str, ...]) -> list[Condition]:
    return ([Condition(layer=layer)]
            + [Condition(layer=layer, method="swap", strength=s) for s in strengths]
            + [Condition(layer=layer, method="swap", strength="auto"),
               Condition(layer=layer, method="clamp", mode="replace"),
               # beyond the paper: edit only the positions that predict new tokens
               Condition(layer=layer, method="swap", strength="auto", steer_prompt=False)]
            + baseline_conditions(layer, baselines))


def frontier_table(bench: Workbench, layer: int, topics: tuple[str, ...], strengths: tuple[float, ...],
                   baselines: tuple[str, ...], opts: TextOptions) -> Table:
    """Rows of every topic's conditions, a per-topic summary of ``auto``, and a scatter plot per topic."""
    all_rows: list[dict[str, Any]] = []
    summary = []
    plots: dict[str, Callable[[Path], object]] = {}
    for topic in topics:
        inputs = condition_inputs(bench, layer, topic, baselines, opts)
        rows, reference = run_conditions(frontier_conditions(layer, strengths, baselines), bench.aligner, inputs)
        add_relative(rows, reference)
        real = reference["real_topic_text_distance"]
        for r in rows:
            r["topic"] = topic
            r["real_distance"] = real
        all_rows += rows
        auto = next(r for r in rows if r["strength"] == "auto")
        summary.append({"topic": topic, "auto_strength": auto["strength_used"], "gap_closed": auto["gap_closed"],
                        "ppl_ratio": auto["ppl_ratio"],
                        "meets_target": bool(auto["gap_closed"] >= 0.5 and auto["ppl_ratio"] <= 1.15)})
        plots[f"frontier_{topic}.png"] = partial(
            scatter_plot, rows=rows, x="ppl", y="distance", label="label",
            title=f"{topic}: topic distance vs judge perplexity (layer {layer})", hline=real,
            hline_label=f"real {topic} text")
    cols = ["topic", "label", "strength_used", "distance", "gap_closed", "ppl", "ppl_ratio", "contamination",
            "distinct2"]
    if opts.acceptability:
        cols.insert(-2, "acceptable")
    note = ("Target: `auto` closes >= 50 % of the distance gap between unsteered and real topic text at <= +15 % "
            "judge perplexity.")
    return Table("frontier", "Topic vs fluency frontier", all_rows, cols, note,
                 {"summary": summary, "timings": bench.fine_tune_times(list(topics))},
                 before=[(summary, list(summary[0]))], plots=plots)
