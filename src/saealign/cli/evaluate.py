"""``saealign eval ...``: the paper's experiments, each writing Markdown + CSV/JSON (+ PNG) to ``--out``.

Every command parses its options, calls one function of :mod:`saealign.evaluate` on a
:class:`~saealign.evaluate.workbench.Workbench` and writes the :class:`~saealign.evaluate.report.Table`
it returns. ``eval all`` runs them all on one workbench (see :mod:`saealign.evaluate.run_all`).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from saealign.cli.common import (
    data_dir,
    data_option,
    friendly,
    parse_choices,
    parse_layers,
    parse_seeds,
    parse_strengths,
    workbench,
)
from saealign.cli.eval_paper import COMMANDS, write
from saealign.cli.steer_bench import steer_bench_cmd, steer_bench_pool_cmd
from saealign.errors import SaealignError
from saealign.evaluate.generation import BASELINES, PAPER_METHODS, TextOptions
from saealign.evaluate.report import write_table
from saealign.steering.spec import METHODS, MODES


@click.group("eval")
def eval_group() -> None:
    """Reproduce the paper's experiments on the embedded defaults (or any model/SAE)."""


for _command in (*COMMANDS, steer_bench_cmd, steer_bench_pool_cmd):
    eval_group.add_command(_command)


@eval_group.command("topic-signal")
@click.option("--layers", default="6,15", show_default=True)
@data_option
@click.option("--max-prompts", default=20_000, show_default=True, help="MMLU prompts in the index (stratified)")
@click.option("--n-topic", default=50, show_default=True, help="MedQuAD texts forming the topic")
@click.option("--top", default=20, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/topic_signal"), show_default=True)
@friendly
def topic_signal_cmd(layers: str, data: Path | None, max_prompts: int, n_topic: int, top: int, out: Path) -> None:
    """Top latents of a MedQuAD topic vs MMLU's medical subjects (activation-mass ratio to the base rate).

    Example: saealign eval topic-signal --layers 6,15
    """
    from saealign.evaluate.tables import topic_signal_table
    from saealign.evaluate.topics import topic_texts

    bench = workbench(data)
    topic_texts(bench.data, "medical")  # a missing file fails before any model loads
    table = topic_signal_table(bench, parse_layers(layers), max_prompts, n_topic, top)
    for row in table.rows:
        click.echo(f"layer {row['layer']}: top-{top} latents put {row['top_share']:.3f} of their mass on medical "
                   f"subjects vs base {row['base_share']:.3f} -> ratio {row['ratio']:.2f}")
    write_table(out, table)
    click.echo(f"wrote {out}/topic_signal.md")


def text_options(judge: str, seeds: str, max_new_tokens: int, n_topic: int, n_heldout: int,
                 acceptability: bool, max_prompts: int | None = None) -> TextOptions:
    return TextOptions(judge, parse_seeds(seeds), max_new_tokens, n_topic, n_heldout, max_prompts, acceptability)


@eval_group.command("generation")
@click.option("--layers", default="6,15", show_default=True)
@click.option("--methods", default=",".join(PAPER_METHODS), show_default=True)
@click.option("--modes", default="error,replace", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--strengths", default="1", show_default=True, help="Swap/Weight strengths: numbers or auto")
@click.option("--baselines", default="prompt,lora,full", show_default=True,
              help="prompting and fine-tuning baselines ('' for none)")
@click.option("--judge", default="gemma3-270m", show_default=True, help="judge LM for perplexity")
@click.option("--acceptability/--no-acceptability", default=False, show_default=True,
              help="also judge acceptability with the CoLA classifier (trained once, cached)")
@data_option
@click.option("--n-topic", default=50, show_default=True, help="MedQuAD texts forming the topic")
@click.option("--n-heldout", default=200, show_default=True, help="other MedQuAD texts to measure distance against")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/generation"), show_default=True)
@friendly
def generation_cmd(layers: str, methods: str, modes: str, seeds: str, strengths: str, baselines: str, judge: str,
                   acceptability: bool, data: Path | None, n_topic: int, n_heldout: int, max_new_tokens: int,
                   out: Path) -> None:
    """Table 2: the medical-metaphor prompts under each method, mode and layer, and the baselines.

    Measures distance to held-out topic text, judge perplexity, contamination, repetition.
    Example: saealign eval generation --layers 15 --modes error --seeds 0 --baselines prompt
    """
    from saealign.evaluate.generation import generation_table, topic_inputs

    method_list, mode_list = parse_choices(methods, METHODS, "method"), parse_choices(modes, MODES, "mode")
    strength_list, baseline_list = parse_strengths(strengths), parse_choices(baselines, BASELINES, "baseline")
    opts = text_options(judge, seeds, max_new_tokens, n_topic, n_heldout, acceptability)
    bench = workbench(data)
    topic_inputs(bench.data, "medical", n_topic, n_heldout)  # bad data fails before any model loads
    write(out, generation_table(bench, parse_layers(layers), method_list, mode_list, strength_list, baseline_list, opts))


@eval_group.command("frontier")
@click.option("--layer", type=int, default=15, show_default=True)
@click.option("--topics", default="medical,amazon,sycophancy", show_default=True)
@click.option("--strengths", default="0.5,1,2,4,8", show_default=True, help="fixed Swap strengths besides auto")
@click.option("--baselines", default="prompt,lora", show_default=True, help="some of prompt,lora,full ('' for none)")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--judge", default="gemma3-270m", show_default=True)
@click.option("--acceptability/--no-acceptability", default=False, show_default=True)
@data_option
@click.option("--n-topic", default=50, show_default=True)
@click.option("--n-heldout", default=200, show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--max-prompts", type=int, default=None, help="use only the first N test prompts")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/frontier"), show_default=True)
@friendly
def frontier_cmd(layer: int, topics: str, strengths: str, baselines: str, seeds: str, judge: str, acceptability: bool,
                 data: Path | None, n_topic: int, n_heldout: int, max_new_tokens: int, max_prompts: int | None,
                 out: Path) -> None:
    """Topic distance vs judge perplexity: Swap at fixed strengths, auto, Clamp, prompting, LoRA, per topic.

    Example: saealign eval frontier --topics medical,amazon,sycophancy
    """
    from saealign.evaluate.frontier import frontier_table
    from saealign.evaluate.generation import topic_inputs
    from saealign.evaluate.topics import TOPICS

    fixed = parse_strengths(strengths)
    if any(isinstance(s, str) for s in fixed):
        raise SaealignError("--strengths lists fixed numbers here: auto is always included")
    names = tuple(dict.fromkeys(parse_choices(topics, tuple(TOPICS), "topic")))
    if not names:
        raise SaealignError(f"unknown topic (none): use some of {', '.join(TOPICS)}")
    baseline_list = parse_choices(baselines, BASELINES, "baseline")
    opts = text_options(judge, seeds, max_new_tokens, n_topic, n_heldout, acceptability, max_prompts)
    bench = workbench(data)
    for name in names:  # every topic's files and sizes are checked before any model loads
        topic_inputs(bench.data, name, n_topic, n_heldout, max_prompts)
    write(out, frontier_table(bench, layer, names, fixed, baseline_list, opts))  # type: ignore[arg-type]


@eval_group.command("all")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/all"), show_default=True)
@click.option("--quick", is_flag=True, help="a small version of every experiment (minutes, not hours)")
@click.option("--layers", default="6,15", show_default=True)
@click.option("--judge", default="gemma3-270m", show_default=True)
@data_option
@click.option("--only", default="all", show_default=True, help="run these sections (comma-separated)")
@click.option("--force", is_flag=True, help="rerun sections that already have results")
@friendly
def all_cmd(out: Path, quick: bool, layers: str, judge: str, data: Path | None, only: str, force: bool) -> None:
    """Every experiment of the paper, for its topics, into OUT/<experiment>/ and OUT/report.md.

    Example: saealign eval all --out reports/all       (hours on a 2-core CPU; --quick: minutes)
    """
    from saealign.evaluate.run_all import QUICK_CLASSIFIER, SECTIONS, sections, write_report

    wanted = SECTIONS if only == "all" else parse_choices(only, SECTIONS, "section")
    data_dir(data)  # fail now, not an hour in
    bench = workbench(data, max_train=QUICK_CLASSIFIER if quick else None)
    runs = sections(quick, parse_layers(layers), judge)
    for name in wanted:
        target = out / name
        if (target / f"{name}.json").exists() and not force:
            click.echo(f"== {name}: already done in {target} (--force reruns it)", err=True)
            continue
        click.echo(f"== {name}", err=True)
        start = time.perf_counter()
        click.echo(write_table(target, runs[name](bench)))
        # after every section, so an interrupted run keeps the wall times (and the report) of what finished
        write_report(out, {name: time.perf_counter() - start}, quick)
    write_report(out, {}, quick)
    click.echo(f"wrote {out / 'report.md'}")
