"""``saealign eval all``: every experiment of the paper, in order, and the report that links their tables.

:func:`sections` says what each experiment runs with (``quick``: a small version of each, minutes
instead of hours: one seed, 16 new tokens, error mode only, the medical topic only, 4 frontier prompts,
strengths 1 and 4 besides auto, LoRA only, a 500-sentence CoLA classifier); the command runs each
on one :class:`~saealign.evaluate.workbench.Workbench` (so models load once and fine-tuned baselines
are reused) and rewrites :func:`write_report` after every section.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from saealign.evaluate.cost import cost_table
from saealign.evaluate.frontier import frontier_table
from saealign.evaluate.generation import PAPER_METHODS, TextOptions, generation_table
from saealign.evaluate.report import Table
from saealign.evaluate.tables import (
    ablation_table,
    acceptability_table,
    coverage_table,
    layer_table,
    topic_signal_table,
    topk_table,
)
from saealign.evaluate.workbench import Workbench

SECTIONS = ("acceptability", "topic_signal", "coverage", "topk", "layer", "ablation", "generation", "frontier", "cost")
QUICK_CLASSIFIER = 500
"""CoLA sentences the quick run's acceptability classifier trains on."""


def sections(quick: bool, layers: Sequence[int], judge: str) -> dict[str, Callable[[Workbench], Table]]:
    """Each experiment of :data:`SECTIONS` with the settings of a full (or ``quick``) run."""
    q = quick
    layers = tuple(layers)
    deepest = max(layers)
    text = TextOptions(judge=judge, seeds=(0,) if q else (0, 1, 2), max_new_tokens=16 if q else 64, n_topic=50,
                       n_heldout=40 if q else 200, acceptability=True)
    frontier = TextOptions(**{**text.__dict__, "seeds": (0,) if q else (0, 1), "max_prompts": 4 if q else None})
    return {
        "acceptability": acceptability_table,
        "topic_signal": partial(topic_signal_table, layers=layers, max_prompts=1000 if q else 5000, n_topic=50, top=20),
        "coverage": partial(coverage_table, layer=deepest, samples=2 if q else 5),
        "topk": partial(topk_table, layers=layers, topic="medical", n_topic=50, n_heldout=20 if q else 100),
        "layer": partial(layer_table, layers=layers, topic="medical", mode="error", n_texts=10 if q else 50),
        "ablation": partial(ablation_table, layer=deepest, topic="medical"),
        "generation": partial(generation_table, layers=layers, methods=PAPER_METHODS,
                              modes=("error",) if q else ("error", "replace"), strengths=(1.0, "auto"),
                              baselines=("prompt", "lora") if q else ("prompt", "lora", "full"), opts=text),
        "frontier": partial(frontier_table, layer=deepest,
                            topics=("medical",) if q else ("medical", "amazon", "sycophancy", "shoes"),
                            strengths=(1.0, 4.0) if q else (0.5, 1.0, 2.0), baselines=("prompt", "lora"), opts=frontier),
        "cost": partial(cost_table, layer=deepest, n_topic=50, finetune=True),
    }


def write_report(out: Path, timings: dict[str, float], quick: bool) -> None:
    """``report.md``: each experiment's table and plots, in order, with this run's wall times."""
    times_path = out / "timings.json"
    known = json.loads(times_path.read_text()) if times_path.exists() else {}
    known.update(timings)
    out.mkdir(parents=True, exist_ok=True)
    times_path.write_text(json.dumps(known, indent=2) + "\n")
    parts = ["# saealign evaluation report" + (" (quick)" if quick else ""), "",
             "Every table below was measured by `saealign eval all` on this machine; raw rows are in each "
             "folder's JSON/CSV.", "", "| experiment | wall time (s) |", "|---|---|"]
    parts += [f"| {k} | {known[k]:.0f} |" for k in SECTIONS if k in known]
    for name in SECTIONS:
        md = out / name / f"{name}.md"
        if not md.exists():
            continue
        body = md.read_text().replace("\n# ", "\n### ").removeprefix("# ")
        parts += ["", f"## {body}"]
        parts += [f"![{png.stem}]({name}/{png.name})" for png in sorted((out / name).glob("*.png"))]
    (out / "report.md").write_text("\n".join(parts) + "\n")
