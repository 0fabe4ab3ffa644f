"""The steering benchmark as a :class:`~saealign.evaluate.report.Table`: summary, per-topic hit rates, frontier PNG."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saealign.errors import SaealignError
from saealign.evaluate.bench_topics import load_bench_topics
from saealign.evaluate.report import Table, scatter_plot
from saealign.evaluate.steer_bench import BenchCondition, BenchConfig, default_conditions, run_steer_bench
from saealign.evaluate.steer_bench_pool import join_runs, pool_runs, read_run
from saealign.evaluate.workbench import Workbench
from saealign.steering.spec import GenerationSpec

SUMMARY_COLUMNS = ["condition", "hit_rate", "ppl_ratio", "ppl_ratio_95ci", "distinct2_ratio", "distance", "strength",
                   "topics_hit_at_least_half"]


@dataclass(frozen=True)
class SteerBenchOptions:
    layer: int = 15
    judge: str = "gemma3-270m"
    groups: tuple[str, ...] | None = None
    n_align: int = 30
    n_heldout: int = 150
    config: BenchConfig = BenchConfig()
    default: GenerationSpec = GenerationSpec()
    conditions: tuple[BenchCondition, ...] | None = None
    """None: :func:`default_conditions` of ``default``."""


PPL_BOUND = 1.15
"""The judge-perplexity ratio the steering targets stay within (issue 12): drawn on the frontier."""
MAIN_ROWS = ("none", "prompting", "prompting + default", "default")
"""The rows the issue's targets read (``--rows main``): unsteered, prompting, prompting + the default, the default."""


def main_conditions(default: GenerationSpec | None = None) -> tuple[BenchCondition, ...]:
    """:func:`default_conditions` cut to :data:`MAIN_ROWS` (the default's row is labelled "default (<its settings>)")."""
    return named_conditions(MAIN_ROWS, default)


def named_conditions(names: tuple[str, ...] | list[str], default: GenerationSpec | None = None) -> tuple[BenchCondition, ...]:
    """The rows of :func:`default_conditions` whose label, before any " (settings)", is one of ``names``, in the
    benchmark's order; one error line naming the rows there are for a name that is none of them."""
    rows = default_conditions(default)
    short = [c.label.split(" (")[0] for c in rows]
    unknown = [n for n in names if n not in short]
    if unknown:
        raise SaealignError(f"no benchmark row is called {', '.join(map(repr, unknown))}: the rows are "
                            + ", ".join(map(repr, short)))
    return tuple(c for c, name in zip(rows, short, strict=True) if name in names)


def quick_options(layer: int = 15, judge: str = "gemma3-270m", default: GenerationSpec | None = None) -> SteerBenchOptions:
    """Minutes instead of an hour: one group, 4 openers, one seed, 16 tokens, the main rows only."""
    default = default or GenerationSpec()
    return SteerBenchOptions(layer, judge, ("clinc",), 30, 40, BenchConfig(4, (0,), 16, 5, 64), default,
                             main_conditions(default))


def per_topic_rows(cells: list[dict[str, Any]], conditions: list[str]) -> list[dict[str, Any]]:
    """One row per topic, one column of hit rates per condition."""
    topics = list(dict.fromkeys(c["topic"] for c in cells))
    out = []
    for t in topics:
        row: dict[str, Any] = {"topic": t, "group": next(c["group"] for c in cells if c["topic"] == t)}
        for label in conditions:
            hit = [c["hit_rate"] for c in cells if c["topic"] == t and c["condition"] == label]
            row[label] = hit[0] if hit else float("nan")
        out.append(row)
    return out


def steer_bench_table(bench: Workbench, opts: SteerBenchOptions) -> Table:
    topics = load_bench_topics(bench.data, opts.n_align, opts.n_heldout, groups=opts.groups)
    conditions = list(opts.conditions or default_conditions(opts.default))
    result = run_steer_bench(bench.aligner(opts.layer), bench.model(opts.judge), topics, conditions, opts.config)
    labels = [c.label for c in conditions]
    per_topic = per_topic_rows(result["cells"], labels)
    base = next((r["hit_rate"] for r in result["rows"] if r["condition"] == "none"), float("nan"))
    prompting = next((r["hit_rate"] for r in result["rows"] if r["condition"] == "prompting"), float("nan"))
    cfg = opts.config
    note = (f"{len(topics)} topics ({', '.join(sorted({t.group for t in topics}))}), {opts.n_align} alignment texts each; "
            f"{cfg.n_openers} neutral openers x {len(cfg.seeds)} seeds x {cfg.max_new_tokens} tokens"
            + (f" (the unsteered row: {len(cfg.unsteered_seeds)} seeds)" if cfg.unsteered_seeds else "")
            + f", top-{cfg.top_k} sampling; layer {opts.layer}. hit_rate: share classified as the steered topic within its group by "
            f"a logistic-regression classifier on MiniLM embeddings trained on held-out texts (accuracy "
            + ", ".join(f"{g} {a:.2f}" for g, a in result["classifier"].items())
            + f"); ppl_ratio: {opts.judge} perplexity of the continuation given the opener, over unsteered "
            f"(geometric mean over topics); distinct2_ratio: distinct bigrams over unsteered. Unsteered hit rate "
            f"{base:.3f}" + ("" if math.isnan(prompting) else f", prompting {prompting:.3f}") + ".")
    summary = [{k: r[k] for k in SUMMARY_COLUMNS if k in r} | {"hit_rate_std": r["hit_rate_seed_std"]} | _interval(r)
               for r in result["rows"]]

    return Table("steer_bench", "Steering benchmark: topic hit rate vs fluency", per_topic,
                 ["topic", "group", *labels], note=note, before=[(summary, SUMMARY_COLUMNS)],
                 extra={k: v for k, v in result.items() if k != "rows"} | {"summary": summary},
                 plots={"steer_bench_frontier.png": _frontier(summary, prompting)})


def _frontier(summary: list[dict[str, Any]], prompting: float) -> Any:
    def plot(path: Path) -> object:
        return scatter_plot(path, summary, "ppl_ratio", "hit_rate", "condition",
                            "Topic hit rate vs judge perplexity (ratio to unsteered)", hline=prompting,
                            hline_label="prompting", vline=PPL_BOUND, vline_label=f"fluency bound {PPL_BOUND:g}x")
    return plot


def _interval(row: dict[str, Any]) -> dict[str, Any]:
    """The perplexity ratio's 95 % interval as a column (and its ends as numbers), where the row has one."""
    if "ppl_ratio_low" not in row:
        return {}
    return {"ppl_ratio_95ci": f"{row['ppl_ratio_low']:.3f}-{row['ppl_ratio_high']:.3f}",
            "ppl_ratio_low": row["ppl_ratio_low"], "ppl_ratio_high": row["ppl_ratio_high"]}


POOL_COLUMNS = ["condition", "hit_rate", "hits", "continuations", "ppl_ratio", "ppl_ratio_95ci", "distinct2_ratio_weighted",
                "topics_hit_at_least_half"]


def pooled_table(paths: list[Path], join: bool = False) -> Table:
    """The rows every run in ``paths`` holds, pooled over their seeds (:mod:`saealign.evaluate.steer_bench_pool`), or
    with ``join`` every row of runs made on the same seeds side by side: summary, per topic hit rate / perplexity
    ratio, and the frontier PNG."""
    runs = [read_run(p) for p in paths]
    pooled = pool_runs([join_runs(runs)] if join else runs)
    labels = [r["condition"] for r in pooled["rows"]]
    cells = pooled["cells"]
    base = {c["topic"]: c["nll"] / c["tokens"] for c in cells if c["condition"] == "none"}
    per_topic = []
    for topic in dict.fromkeys(c["topic"] for c in cells):
        row: dict[str, Any] = {"topic": topic}
        for c in cells:
            if c["topic"] == topic:
                ratio = math.exp(c["nll"] / c["tokens"] - base[topic])
                row[c["condition"]] = f"{c['hit_rate']:.3f} / {ratio:.3f}"
        per_topic.append(row)
    prompting = next((r["hit_rate"] for r in pooled["rows"] if r["condition"] == "prompting"), float("nan"))
    how = "joined (the same seeds, rows side by side)" if join else "pooled"
    note = (f"{len(paths)} runs {how} over seeds {','.join(map(str, sorted(pooled['seeds'])))}: hits and judge "
            "NLL summed per cell (per topic: hit rate / perplexity ratio to unsteered below); distinct2_ratio_weighted "
            "is each run's distinct-2 ratio averaged with its continuations as weights (distinct-2 does not pool)."
            + (f" Rows not in every run, left out: {', '.join(pooled['left_out'])}." if pooled["left_out"] else ""))
    return Table("steer_bench_pooled", "Steering benchmark, runs pooled", per_topic, ["topic", *labels], note=note,
                 before=[([r | _interval(r) for r in pooled["rows"]], POOL_COLUMNS)], extra={"cells": cells, "seeds": pooled["seeds"],
                                                               "runs": [str(p) for p in paths], "summary": pooled["rows"]},
                 plots={"steer_bench_frontier.png": _frontier(pooled["rows"], prompting)})
