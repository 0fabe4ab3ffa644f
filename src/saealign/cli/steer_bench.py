"""``saealign eval steer-bench``: topic hit rate vs fluency for every steering method, against prompting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from saealign.cli.common import data_option, friendly, parse_seeds, workbench
from saealign.errors import SaealignError


@click.command("steer-bench")
@click.option("--layer", default=15, show_default=True)
@click.option("--judge", default="gemma3-270m", show_default=True, help="judge LM (perplexity, classifier features)")
@click.option("--groups", default="", help="topic groups (mmlu, clinc, amazon; default all)")
@click.option("--openers", default=16, show_default=True, help="neutral openers continued per topic")
@click.option("--seeds", default="0,1", show_default=True)
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--rows", type=click.Choice(["all", "main"]), default="all", show_default=True,
              help="main: only none, prompting, prompting + default and the default (a quarter of the time)")
@click.option("--quick", is_flag=True, help="one group, 4 openers, 1 seed, 16 tokens, main rows (minutes)")
@data_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/steer_bench"), show_default=True)
@friendly
def steer_bench_cmd(layer: int, judge: str, groups: str, openers: int, seeds: str, max_new_tokens: int, rows: str,
                    quick: bool, data: Path | None, out: Path) -> None:
    """Steer 12 topics (MMLU, CLINC150, Amazon groups) with every method; hit rate by an independent classifier.

    Example: saealign eval steer-bench --out reports/steer_bench
    """
    from saealign.evaluate.bench_topics import GROUPS
    from saealign.evaluate.report import write_table
    from saealign.evaluate.steer_bench import BenchConfig
    from saealign.evaluate.steer_bench_table import (
        SteerBenchOptions,
        main_conditions,
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
        opts = SteerBenchOptions(layer, judge, chosen, config=BenchConfig(openers, parse_seeds(seeds), max_new_tokens),
                                 conditions=main_conditions() if rows == "main" else None)
    if chosen:
        opts = replace(opts, groups=chosen)
    md = write_table(out, steer_bench_table(bench, opts))
    click.echo(md.split("\n\n| topic")[0])
    click.echo(f"wrote {out}/steer_bench.md, .json, .csv and steer_bench_frontier.png")


@click.command("steer-bench-pool")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/steer_bench_pooled"), show_default=True)
@friendly
def steer_bench_pool_cmd(runs: tuple[Path, ...], out: Path) -> None:
    """Pool steer-bench runs made on different seeds into one measurement (hits and judge NLL summed per cell).

    Example: saealign eval steer-bench-pool reports/steer_bench_run9_heldout reports/steer_bench_run10_heldout
    """
    from saealign.evaluate.report import write_table
    from saealign.evaluate.steer_bench_table import pooled_table

    md = write_table(out, pooled_table(list(runs)))
    click.echo(md.split("\n\n| topic")[0])
    click.echo(f"wrote {out}/steer_bench_pooled.md, .json, .csv and steer_bench_frontier.png")
