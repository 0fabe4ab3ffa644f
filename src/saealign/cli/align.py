"""``saealign score``, ``generate``, ``demo`` and ``serve``: scoring topics and steered generation."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

import click

from saealign.cli.common import friendly, load_aligner, read_topic_texts, stack_options
from saealign.errors import SaealignError
from saealign.steering.spec import METHODS, MODES, STRENGTH_METHODS, UNSCORED, GenerationSpec

F = TypeVar("F", bound=Callable[..., Any])
SPEC_OPTIONS = [
    click.option("--method", type=click.Choice(METHODS), default="swap", show_default=True),
    click.option("--mode", type=click.Choice(MODES), default="error", show_default=True,
                 help="error: keep the SAE's reconstruction error; replace: layer output = SAE decode (the paper)"),
    click.option("--strength", default="auto", show_default=True,
                 help="how hard the method steers (Swap/Weight: scores**strength, 1 = the paper); auto: the "
                      "strongest within the fluency budget, searched once per topic"),
    click.option("--max-new-tokens", default=64, show_default=True),
    click.option("--top-k", default=5, show_default=True),
    click.option("--temperature", default=1.0, show_default=True),
    click.option("--greedy", is_flag=True, help="argmax decoding instead of top-k sampling"),
    click.option("--chat/--no-chat", default=False, show_default=True, help="wrap prompts in the model's chat template"),
    click.option("--steer-prompt/--no-steer-prompt", default=True, show_default=True,
                 help="also edit the prompt's positions (no: only the positions that predict new tokens)"),
    click.option("--clamp-n", default=5, show_default=True, help="clamp: latents forced on"),
    click.option("--clamp-multiplier", default=10.0, show_default=True, help="clamp: forced value / max activation"),
    click.option("--unscored", type=click.Choice(UNSCORED), default="drop", show_default=True,
                 help="swap/weight: what latents the topic did not score weigh"),
    click.option("--n-latents", default=64, show_default=True, help="additive methods: latents in the direction"),
]
SPEC_FIELDS = {f.name for f in fields(GenerationSpec)}


def spec_options(fn: F) -> F:
    """One option per :class:`GenerationSpec` field; the command receives them built and checked as ``spec``."""

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        try:
            spec = GenerationSpec(**{k: kwargs.pop(k) for k in SPEC_FIELDS})
        except SaealignError as e:  # before anything loads
            raise click.ClickException(str(e)) from None
        return fn(spec=spec, **kwargs)

    for option in reversed(SPEC_OPTIONS):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


@click.command("score")
@stack_options
@click.option("--topic-file", "topic_files", multiple=True, help="topic texts, one a line (txt or jsonl); repeatable")
@click.option("--topic", "topic_texts", multiple=True, help="a topic text; repeatable")
@click.option("--top", default=10, show_default=True, help="latents to show")
@click.option("--examples", default=2, show_default=True, help="reference texts shown per latent")
@click.option("--summary", default="normalized_sum", show_default=True, help="normalized_sum, sum, mean, max, binary")
@click.option("--metric", default="euclidean", show_default=True, help="euclidean or cosine")
@click.option("--min-prompts", default=20, show_default=True, help="latents firing on fewer prompts are unscored")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="save the TopicScores folder here")
@friendly
def score_cmd(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
              max_prompts: int, topic_files: tuple[str, ...], topic_texts: tuple[str, ...], top: int, examples: int,
              summary: str, metric: str, min_prompts: int, as_json: bool, output: Path | None) -> None:
    """Score every SAE latent against a topic (M1) and show the most aligned ones.

    Example: saealign score --topic-file src/saealign/data/topics/medical.txt --top 10
    """
    texts = read_topic_texts(topic_files, topic_texts)
    aligner = load_aligner(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)
    index = aligner.index
    assert index is not None  # the stack always has one
    start = time.perf_counter()
    scores = aligner.topic(texts, summary=summary, metric=metric, min_prompts=min_prompts)
    seconds = time.perf_counter() - start
    if output is not None:
        scores.save(output)
    rows: list[dict[str, Any]] = [
        {"latent": i, "score": float(scores.scores[i]), "g": float(scores.g[i]), "prompts": int(scores.n_prompts[i]),
         "examples": [t for t, _ in index.top_texts(i, examples)]}
        for i in scores.top(top)
    ]
    if as_json:
        click.echo(json.dumps({"layer": aligner.layer, "topic_texts": len(texts), "seconds": seconds,
                               "note": scores.note, "scored": int(scores.scored.sum()), "top": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top {top} latents for the topic ({len(texts)} texts, layer {aligner.layer}, "
                        f"scored in {seconds:.3f} s)")
    for col in ("latent", "score", "g", "prompts", "top reference texts"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["latent"]), f"{r['score']:.3f}", f"{r['g']:.3f}", str(r["prompts"]),
                      "\n".join(t[:100] for t in r["examples"]))
    Console().print(table)
    if scores.note:
        click.echo(f"note: {scores.note}")
    if output is not None:
        click.echo(f"saved scores to {output}")


@click.command("generate")
@stack_options
@click.argument("prompts", nargs=-1)
@click.option("--topic-file", "topic_files", multiple=True, help="topic texts, one a line (txt or jsonl); repeatable")
@click.option("--topic", "topic_texts", multiple=True, help="a topic text; repeatable")
@click.option("--scores", "scores_path", type=click.Path(path_type=Path), default=None, help="a TopicScores folder (saealign score -o)")
@click.option("--seed", default=0, show_default=True)
@click.option("--prompts-file", type=click.Path(path_type=Path), default=None, help="prompts, one a line")
@click.option("--min-prompts", default=20, show_default=True, help="latents firing on fewer reference prompts are unscored")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line instead of a side-by-side view")
@spec_options
@friendly
def generate_cmd(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
                 max_prompts: int, prompts: tuple[str, ...], topic_files: tuple[str, ...], topic_texts: tuple[str, ...],
                 scores_path: Path | None, spec: GenerationSpec, seed: int, prompts_file: Path | None,
                 min_prompts: int, as_json: bool) -> None:
    """Generate continuations steered toward a topic (M2), with per-token contamination.

    Example: saealign generate --topic-file src/saealign/data/topics/medical.txt "My heart is broken, so I should"
    """
    from saealign.reference.corpus import read_topic
    from saealign.reference.scoring import TopicScores

    prompt_list = list(prompts) + (read_topic([prompts_file]) if prompts_file else [])
    if not prompt_list:
        raise SaealignError("give at least one prompt (arguments or --prompts-file)")
    aligner = load_aligner(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)
    topic = None
    if scores_path is not None:
        topic = TopicScores.load(scores_path)
    elif topic_files or topic_texts:
        topic = aligner.topic(read_topic_texts(topic_files, topic_texts), min_prompts=min_prompts)
    elif spec.method != "none":
        raise SaealignError(f"--method {spec.method} needs a topic: --topic-file, --topic or --scores")
    if topic is not None and spec.is_auto and spec.method in STRENGTH_METHODS:
        known = len(topic.extra.get("auto_strength", {}))
        click.echo(aligner.auto_strength(topic, spec).describe(), err=True)
        if scores_path is not None and len(topic.extra["auto_strength"]) > known:
            topic.save(scores_path)  # keep the search with the scores: the next run reuses it
    steered = aligner.generate(prompt_list, topic, spec, seed=seed)
    if as_json:
        for g in steered:
            click.echo(json.dumps({"prompt": g.prompt, "method": g.method, "mode": g.mode, "strength": g.strength,
                                   "text": g.text, "contamination": g.contamination,
                                   "token_contamination": g.token_contamination}))
        return
    from rich.console import Console

    from saealign.demo import side_by_side

    plain = steered if spec.method == "none" else aligner.generate(prompt_list, topic, replace(spec, method="none"),
                                                                   seed=seed)
    Console().print(side_by_side(plain, steered, f"layer {aligner.layer}: unsteered vs {spec.method} ({spec.mode})"))


@click.command("demo")
@click.option("--layer", type=int, default=None, help="which shipped SAE to steer with (default: 15)")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--seed", default=0, show_default=True)
@friendly
def demo_cmd(layer: int | None, max_new_tokens: int, seed: int) -> None:
    """The main job: a medical topic steers the paper's 12 metaphor prompts (unsteered vs Swap).

    Example: saealign demo
    """
    from saealign.demo import run_demo

    run_demo(layer=layer, max_new_tokens=max_new_tokens, seed=seed)


@click.command("serve")
@stack_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--max-new-tokens", "max_new_tokens_limit", default=256, show_default=True, help="per-request limit")
@friendly
def serve_cmd(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
              max_prompts: int, host: str, port: int, max_new_tokens_limit: int) -> None:
    """Serve aligned generation over HTTP (JSON API, OpenAI-compatible routes, and a page at /).

    Example: saealign serve --port 8000   # then open http://127.0.0.1:8000/
    """
    from saealign.serve.app import ServerLimits, serve

    aligner = load_aligner(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)
    serve(aligner, host=host, port=port, limits=ServerLimits(max_new_tokens=max_new_tokens_limit))
