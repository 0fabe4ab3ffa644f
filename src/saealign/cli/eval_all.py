"""``saealign eval frontier`` and ``saealign eval all``: every experiment by one command, with a report.

``eval all --out DIR`` runs each experiment into ``DIR/<name>/`` and writes ``DIR/report.md`` linking
their tables and plots. A finished experiment (its JSON exists) is skipped on the next run, so an
interrupted ``eval all`` resumes; ``--force`` reruns everything. ``--quick`` shrinks every experiment
(one seed, 16 new tokens, error mode only, the medical topic only, 4 frontier prompts, strengths 1 and 4
besides auto, LoRA only, a 500-sentence CoLA classifier) so the whole pipeline runs in minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from saealign.cli import evaluation as cli_eval
from saealign.cli.app import friendly, parse_layers
from saealign.cli.evaluation import data_option, eval_group


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
    from saealign.cli.eval_suite import (
        frontier_table,
        parse_baselines,
        parse_strengths,
        suite_options,
        topic_inputs,
    )
    from saealign.errors import SaealignError
    from saealign.evaluate.topics import TOPICS

    fixed = parse_strengths(strengths)
    if any(isinstance(s, str) for s in fixed):
        raise SaealignError("--strengths lists fixed numbers here: auto is always included")
    names = tuple(dict.fromkeys(t.strip() for t in topics.split(",") if t.strip()))
    unknown = [t for t in names if t not in TOPICS]
    if unknown or not names:
        raise SaealignError(f"unknown topic {', '.join(unknown) or '(none)'}: use some of {', '.join(TOPICS)}")
    baseline_list = parse_baselines(baselines)
    root = cli_eval._data_dir(data)
    for name in names:  # every topic's files and sizes are checked before any model loads
        topic_inputs(root, name, n_topic, n_heldout, max_prompts)
    opts = suite_options(data, judge, seeds, max_new_tokens, n_topic, n_heldout, acceptability, max_prompts)
    frontier_table(lambda lay: cli_eval._aligner_for(lay), layer, names, fixed, baseline_list,  # type: ignore[arg-type]
                   opts, out)


SECTIONS = ("acceptability", "topic_signal", "coverage", "topk", "layer", "ablation", "generation", "frontier", "cost")


@eval_group.command("all")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/all"), show_default=True)
@click.option("--quick", is_flag=True, help="a small version of every experiment (minutes, not hours)")
@click.option("--layers", default="6,15", show_default=True)
@click.option("--judge", default="gemma3-270m", show_default=True)
@data_option
@click.option("--only", default=",".join(SECTIONS), show_default=True, help="run these sections")
@click.option("--force", is_flag=True, help="rerun sections that already have results")
@click.pass_context
@friendly
def all_cmd(ctx: click.Context, out: Path, quick: bool, layers: str, judge: str, data: Path | None, only: str,
            force: bool) -> None:
    """Every experiment of the paper, for its topics, into OUT/<experiment>/ and OUT/report.md.

    Example: saealign eval all --out reports/all       (hours on a 2-core CPU; --quick: minutes)
    """
    from saealign.cli.eval_paper import (
        ablation_cmd,
        cost_cmd,
        coverage_cmd,
        layer_cmd,
        topk_cmd,
        train_acceptability_cmd,
    )
    from saealign.cli.eval_suite import ACCEPTABILITY_MAX_TRAIN
    from saealign.cli.evaluation import generation_cmd, topic_signal_cmd
    from saealign.errors import SaealignError

    wanted = [s for s in only.split(",") if s]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SaealignError(f"unknown section {', '.join(unknown)}: use some of {', '.join(SECTIONS)}")
    cli_eval._data_dir(data)  # fail now, not an hour in
    layer_list = parse_layers(layers)
    deepest = max(layer_list)
    q = quick
    seeds = "0" if q else "0,1,2"
    gen = dict(judge=judge, data=data, seeds=seeds, max_new_tokens=16 if q else 64, n_topic=50,
               n_heldout=40 if q else 200)
    runs: dict[str, tuple[click.Command, dict[str, Any]]] = {
        "acceptability": (train_acceptability_cmd, dict(data=data, model="default", max_train=500 if q else None)),
        "topic_signal": (topic_signal_cmd, dict(layers=layers, data=data, max_prompts=1000 if q else 5000, n_topic=50,
                                                top=20)),
        "coverage": (coverage_cmd, dict(layer=deepest, samples=2 if q else 5)),
        "topk": (topk_cmd, dict(layers=layers, topic_name="medical", data=data, n_topic=50, n_heldout=20 if q else 100)),
        "layer": (layer_cmd, dict(layers=layers, topic_name="medical", data=data, mode="error", n_texts=10 if q else 50)),
        "ablation": (ablation_cmd, dict(layer=deepest, topic_name="medical", data=data)),
        "generation": (generation_cmd, dict(layers=layers, methods="none,sae,clamp,swap,weight",
                                            modes="error" if q else "error,replace", strengths="1,auto",
                                            baselines="prompt,lora" if q else "prompt,lora,full",
                                            acceptability=True, **gen)),
        "frontier": (frontier_cmd, dict(layer=deepest, topics="medical" if q else "medical,amazon,sycophancy,shoes",
                                        strengths="1,4" if q else "0.5,1,2", baselines="prompt,lora",
                                        acceptability=True, max_prompts=4 if q else None, **{**gen, "seeds": "0" if q else "0,1"})),
        "cost": (cost_cmd, dict(layer=deepest, data=data, n_topic=50, finetune=True)),
    }
    # the generated-text experiments judge acceptability with the classifier the acceptability section trained
    ctx.meta[ACCEPTABILITY_MAX_TRAIN] = runs["acceptability"][1]["max_train"]
    for name in wanted:
        target = out / name
        if (target / f"{name}.json").exists() and not force:
            click.echo(f"== {name}: already done in {target} (--force reruns it)", err=True)
            continue
        click.echo(f"== {name}", err=True)
        start = time.perf_counter()
        cmd, kwargs = runs[name]
        ctx.invoke(cmd, **kwargs, out=target)
        # after every section, so an interrupted run keeps the wall times (and the report) of what finished
        write_report(out, {name: time.perf_counter() - start}, quick)
    write_report(out, {}, quick)
    click.echo(f"wrote {out / 'report.md'}")


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
