"""``saealign eval ...``: the paper's experiments, each writing Markdown + CSV/JSON (+ PNG) to ``--out``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import click

from saealign.cli.app import friendly, main, parse_layers
from saealign.errors import SaealignError

if TYPE_CHECKING:
    from saealign.steering.aligner import Aligner


def _data_dir(data: Path | None) -> Path:
    from saealign.defaults import shared_data_dir

    found = data or shared_data_dir()
    if found is None or not found.is_dir():
        raise SaealignError("the evaluation needs the shared data folder: pass --data DIR (holding reference/ and topics/)")
    return found


def topic_split(texts: list[str], n_topic: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint random samples: ``n_topic`` texts to score the topic, ``n_heldout`` to measure distance.

    Duplicates are dropped first, so no text can land in both parts.
    """
    texts = list(dict.fromkeys(texts))
    if len(texts) < n_topic + n_heldout:
        raise SaealignError(f"the topic file has {len(texts)} texts; {n_topic} + {n_heldout} are needed for disjoint splits")
    picked = random.Random(seed).sample(texts, n_topic + n_heldout)
    return picked[:n_topic], picked[n_topic:]


_ALIGNERS: dict[int, Aligner] = {}


data_option = click.option("--data", type=click.Path(path_type=Path), default=None,
                           help="shared data folder (default ../shared/data)")


def _aligner_for(layer: int) -> Aligner:
    """The default stack at ``layer``, built once per process (``eval all`` asks for it in every experiment)."""
    from saealign.defaults import load_stack
    from saealign.steering.aligner import Aligner

    if layer not in _ALIGNERS:
        _ALIGNERS[layer] = Aligner(*load_stack(layer=layer))
    return _ALIGNERS[layer]


@main.group("eval")
def eval_group() -> None:
    """Reproduce the paper's experiments on the embedded defaults (or any model/SAE)."""


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
    import time

    from saealign.defaults import load_stack
    from saealign.evaluate.report import markdown_table, write_rows
    from saealign.evaluate.topic_signal import medical_mass_ratio
    from saealign.evaluate.topics import topic_texts

    root = _data_dir(data)
    topic, _ = topic_split(topic_texts(root, "medical"), n_topic, 0)
    rows = []
    for layer in parse_layers(layers):
        _lm, _sae, _layer, index, embedder = load_stack(layer=layer, corpus_spec=str(root / "reference" / "mmlu.jsonl.gz"),
                                                        max_prompts=max_prompts)
        start = time.perf_counter()
        scores = index.score(topic, embedder)
        seconds = time.perf_counter() - start
        row = {"layer": layer, **medical_mass_ratio(index, scores, top), "score_seconds": seconds,
               "top_latents": scores.top(top)}
        rows.append(row)
        click.echo(f"layer {layer}: top-{top} latents put {row['top_share']:.3f} of their mass on medical subjects "
                   f"vs base {row['base_share']:.3f} -> ratio {row['ratio']:.2f}")
    write_rows(out, "topic_signal", rows)
    table = markdown_table(rows, ["layer", "prompts", "medical_prompts", "top_share", "base_share", "ratio", "score_seconds"])
    (out / "topic_signal.md").write_text("# Topic signal: MedQuAD topic vs MMLU medical subjects\n\n" + table)
    click.echo(f"wrote {out}/topic_signal.md")


@eval_group.command("generation")
@click.option("--layers", default="6,15", show_default=True)
@click.option("--methods", default="none,sae,clamp,swap,weight", show_default=True)
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
    from saealign.cli.eval_suite import (
        generation_table,
        parse_baselines,
        parse_strengths,
        suite_options,
        topic_inputs,
    )

    bad = [m for m in methods.split(",") if m not in ("none", "sae", "clamp", "swap", "weight")]
    bad += [m for m in modes.split(",") if m not in ("error", "replace")]
    if bad:
        raise SaealignError(f"unknown method or mode {', '.join(bad)}: methods none,sae,clamp,swap,weight; modes error,replace")
    strength_list, baseline_list = parse_strengths(strengths), parse_baselines(baselines)
    topic_inputs(_data_dir(data), "medical", n_topic, n_heldout)  # bad data fails before any model loads
    opts = suite_options(data, judge, seeds, max_new_tokens, n_topic, n_heldout, acceptability)
    generation_table(lambda layer: _aligner_for(layer), parse_layers(layers), tuple(methods.split(",")),
                     tuple(modes.split(",")), strength_list, baseline_list, opts, out)


# The other eval commands live in their own modules; importing them registers them on ``eval_group``.
from saealign.cli import eval_all, eval_paper  # noqa: E402,F401
