"""``saealign eval steer-bench``: topic hit rate vs fluency for every steering method, against prompting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from saealign.cli.common import data_option, friendly, parse_seeds, workbench
from saealign.errors import SaealignError

if TYPE_CHECKING:
    from saealign.evaluate.steer_bench import BenchCondition


@click.command("steer-bench")
@click.option("--layer", default=15, show_default=True)
@click.option("--judge", default="gemma3-270m", show_default=True, help="judge LM (perplexity, classifier features)")
@click.option("--groups", default="", help="topic groups (mmlu, clinc, amazon; default all)")
@click.option("--openers", default=16, show_default=True, help="neutral openers continued per topic")
@click.option("--seeds", default="0,1", show_default=True)
@click.option("--unsteered-seeds", default="", help="seeds of the unsteered row, the denominator of every perplexity "
                                                    "ratio (default: --seeds); more of them steady every ratio")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--rows", default="all", show_default=True,
              help="all; main: only none, prompting, prompting + default and the default (a quarter of the time); "
                   "or row names, comma-joined (e.g. 'none,default,add 0.1')")
@click.option("--quick", is_flag=True, help="one group, 4 openers, 1 seed, 16 tokens, main rows (minutes)")
@data_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/steer_bench"), show_default=True)
@friendly
def steer_bench_cmd(layer: int, judge: str, groups: str, openers: int, seeds: str, unsteered_seeds: str,
                    max_new_tokens: int, rows: str, quick: bool, data: Path | None, out: Path) -> None:
    """Steer 12 topics (MMLU, CLINC150, Amazon groups) with every method; hit rate by an independent classifier.

    Example: saealign eval steer-bench --out reports/steer_bench
    """
    from saealign.evaluate.bench_topics import GROUPS
    from saealign.evaluate.report import write_table
    from saealign.evaluate.steer_bench import BenchConfig
    from saealign.evaluate.steer_bench_table import (
        SteerBenchOptions,
        quick_options,
        steer_bench_table,
    )

    if not 1 <= openers <= 16:
        raise SaealignError(f"--openers must be between 1 and 16 (the shipped openers), got {openers}")
    chosen = tuple(g for g in groups.split(",") if g.strip()) or None
    if chosen and any(g not in {x.name for x in GROUPS} for g in chosen):
        raise SaealignError(f"unknown --groups {groups!r}: use some of {', '.join(x.name for x in GROUPS)}")
    bench = workbench(data)
    if quick:
        opts = quick_options(layer, judge)
    else:
        base = parse_seeds(unsteered_seeds, "--unsteered-seeds") if unsteered_seeds.strip() else None
        opts = SteerBenchOptions(layer, judge, chosen, conditions=_rows(rows),
                                 config=BenchConfig(openers, parse_seeds(seeds), max_new_tokens, unsteered_seeds=base))
    if chosen:
        opts = replace(opts, groups=chosen)
    md = write_table(out, steer_bench_table(bench, opts))
    click.echo(md.split("\n\n| topic")[0])
    click.echo(f"wrote {out}/steer_bench.md, .json, .csv and steer_bench_frontier.png")


def _rows(rows: str) -> tuple[BenchCondition, ...] | None:
    """``--rows``: None for all of them, else the named ones (``main``: :data:`MAIN_ROWS`)."""
    from saealign.evaluate.steer_bench_table import MAIN_ROWS, named_conditions

    if rows.strip() == "all":
        return None
    names = MAIN_ROWS if rows.strip() == "main" else tuple(n.strip() for n in rows.split(",") if n.strip())
    if not names:
        raise SaealignError("--rows is empty: give all, main or row names")
    return named_conditions(names)


@click.command("steer-bench-pool")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--join", is_flag=True, help="runs on the same seeds: put their rows side by side (rows they share "
                                           "must match cell for cell) instead of pooling seeds")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/steer_bench_pooled"), show_default=True)
@friendly
def steer_bench_pool_cmd(runs: tuple[Path, ...], join: bool, out: Path) -> None:
    """Pool steer-bench runs made on different seeds into one measurement (hits and judge NLL summed per cell), or
    with --join put the rows of runs on the same seeds side by side.

    Example: saealign eval steer-bench-pool reports/steer_bench_run9_heldout reports/steer_bench_run10_heldout
    """
    from saealign.evaluate.report import write_table
    from saealign.evaluate.steer_bench_table import pooled_table

    md = write_table(out, pooled_table(list(runs), join))
    click.echo(md.split("\n\n| topic")[0])
    click.echo(f"wrote {out}/steer_bench_pooled.md, .json, .csv and steer_bench_frontier.png")
