"""``saealign score``, ``generate``, ``demo`` and ``serve``: scoring topics and steered generation."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from saealign.cli.common import (
    friendly,
    json_line,
    load_aligner,
    read_prompts_file,
    read_topic_texts,
    stack_options,
)
from saealign.errors import SaealignError
from saealign.steering.spec import (
    ADDITIVE,
    COMPANION_MAIN_SHARE,
    DEFAULT_COMPANION_PUSH,
    DEFAULT_METHOD,
    DEFAULT_PROMPT_BOOST,
    DEFAULT_SLOT_PUSH,
    DEFAULT_TUNE_STEPS,
    LATENT_DIRECTIONS,
    METHODS,
    MODES,
    STRENGTH_METHODS,
    UNSCORED,
    GenerationSpec,
)

if TYPE_CHECKING:
    from saealign.reference.scoring import TopicScores

F = TypeVar("F", bound=Callable[..., Any])
SPEC_OPTIONS = [
    click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True),
    click.option("--mode", type=click.Choice(MODES), default="error", show_default=True,
                 help="error: keep the SAE's reconstruction error; replace: layer output = SAE decode (the paper)"),
    click.option("--strength", default=None,
                 help="how hard the method steers (add, diffmean: x median residual norm, default 0.05; Swap/Weight: "
                      "scores**strength, default 1 = the paper); auto: the strongest within the fluency budget, "
                      "searched once per topic"),
    click.option("--max-new-tokens", default=64, show_default=True),
    click.option("--top-k", default=5, show_default=True),
    click.option("--temperature", type=float, default=None,
                 help="divides the logits before sampling (default: 1.2 for add and diffmean, part of their "
                      "default recipe; 1 for the other methods)"),
    click.option("--greedy", is_flag=True, help="argmax decoding instead of top-k sampling"),
    click.option("--chat/--no-chat", default=False, show_default=True, help="wrap prompts in the model's chat template"),
    click.option("--steer-prompt/--no-steer-prompt", default=True, show_default=True,
                 help="also edit the prompt's positions (no: only the positions that predict new tokens)"),
    click.option("--clamp-n", default=5, show_default=True, help="clamp: latents forced on"),
    click.option("--clamp-multiplier", default=10.0, show_default=True, help="clamp: forced value / max activation"),
    click.option("--unscored", type=click.Choice(UNSCORED), default="drop", show_default=True,
                 help="swap/weight: what latents the topic did not score weigh"),
    click.option("--n-latents", default=64, show_default=True, help="add, swap_add: latents in the direction"),
    click.option("--output-scores/--no-output-scores", default=True, show_default=True,
                 help="add, swap_add: weigh latents by their output scores too"),
    click.option("--contrast/--no-contrast", default=True, show_default=True,
                 help="add, swap_add: weigh latents by how much more they fire on the topic texts than on "
                      "reference text (the corpus and the model's own unsteered text)"),
    click.option("--output-match/--no-output-match", default=True, show_default=True,
                 help="add, swap_add: weigh latents by how near the words they make the model say are to the "
                      "topic texts"),
    click.option("--feedback/--no-feedback", default=False, show_default=True,
                 help="additive methods: fade the push as the generated text reads like the topic"),
    click.option("--prompt-boost", type=float, default=None,
                 help="additive methods: push the prompt this many times harder than each generated token "
                      f"(default {DEFAULT_PROMPT_BOOST['add']:g} for add and diffmean, else 1: one push throughout)"),
    click.option("--companion-push", type=float, default=None,
                 help="additive methods: also push at the companion layers (blocks 6 and 10 for the defaults), this "
                      "many times (x each one's weight) as hard as the main layer, which then takes "
                      f"{COMPANION_MAIN_SHARE:.3g} of the strength; 0 = one layer (default {DEFAULT_COMPANION_PUSH:.3g} "
                      "where the stack has companion layers, else 0)"),
    click.option("--tune-steps", type=int, default=None,
                 help="add: tune the mix of the topic's latents for this many steps so the pushed model finds the "
                      "topic texts likely (once per topic and strength, cached); 0 = untuned (default "
                      f"{DEFAULT_TUNE_STEPS['add']})"),
    click.option("--slot-push", type=float, default=None,
                 help="additive methods: read the prompt after 'Notes on something.' with the "
                      "placeholder pushed this hard along the topic direction (strength units); 0 = no slot "
                      f"(default {DEFAULT_SLOT_PUSH['add']:g} for add and diffmean, else 0)"),
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
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="save the TopicScores folder here (a new or empty folder, or one saealign wrote)")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None,
              help="also write the scores as the paper authors' CSV (latent,score; NaN = unscored)")
@friendly
def score_cmd(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
              max_prompts: int, topic_files: tuple[str, ...], topic_texts: tuple[str, ...], top: int, examples: int,
              summary: str, metric: str, min_prompts: int, as_json: bool, output: Path | None,
              csv_path: Path | None) -> None:
    """Score every SAE latent against a topic (M1) and show the most aligned ones.

    Example: saealign score --topic-file src/saealign/data/topics/medical.txt --top 10 --csv medical.csv
    """
    from saealign.cache import check_replaceable
    from saealign.reference.authors_csv import check_csv_target, write_authors_csv

    texts = read_topic_texts(topic_files, topic_texts)
    # where the results go is checked before the model loads: a refused path costs nothing
    if output is not None:
        check_replaceable(output)
    if csv_path is not None:
        check_csv_target(csv_path)
    aligner = load_aligner(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)
    index = aligner.index
    assert index is not None  # the stack always has one
    start = time.perf_counter()
    scores = aligner.topic(texts, summary=summary, metric=metric, min_prompts=min_prompts)
    seconds = time.perf_counter() - start
    if output is not None:
        scores.save(output)
    if csv_path is not None:
        write_authors_csv(scores, csv_path)
    rows: list[dict[str, Any]] = [
        {"latent": i, "score": float(scores.scores[i]), "g": float(scores.g[i]), "prompts": int(scores.n_prompts[i]),
         "examples": [t for t, _ in index.top_texts(i, examples)]}
        for i in scores.top(top)
    ]
    if as_json:
        click.echo(json_line({"layer": aligner.layer, "topic_texts": len(texts), "seconds": seconds,
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
    if csv_path is not None:
        click.echo(f"saved the scores CSV to {csv_path}")


@click.command("generate")
@stack_options
@click.argument("prompts", nargs=-1)
@click.option("--topic-file", "topic_files", multiple=True, help="topic texts, one a line (txt or jsonl); repeatable")
@click.option("--topic", "topic_texts", multiple=True, help="a topic text; repeatable")
@click.option("--scores", "scores_path", type=click.Path(path_type=Path), default=None,
              help="a TopicScores folder (saealign score -o) or a score CSV (latent,score; NaN = unscored)")
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
    from saealign.steering.plan import encode_prompt

    # Every input is read and checked before the model loads (seconds) and the strength search (minutes).
    prompt_list = list(prompts) + (read_prompts_file(prompts_file) if prompts_file else [])
    if not prompt_list:
        raise SaealignError("give at least one prompt (arguments or --prompts-file)")
    texts = read_topic_texts(topic_files, topic_texts) if topic_files or topic_texts else None
    topic = _read_scores(scores_path, texts, spec) if scores_path is not None else None
    if topic is None and texts is None and spec.method != "none":
        raise SaealignError(f"--method {spec.method} needs a topic: --topic-file, --topic or --scores")
    aligner = load_aligner(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)
    for i, p in enumerate(prompt_list):
        encode_prompt(aligner.lm, i, p, spec.chat, spec.max_new_tokens)  # too long for the model: say so now
    if topic is not None:
        topic.check_compatible(aligner.sae_key, aligner.sae.d_sae)
        if not topic.topic_texts and spec.method in ADDITIVE and aligner.resolve(spec).companion_push:
            raise SaealignError(f"--scores {scores_path} holds scores only, and the companion layers' push reads the "
                                "topic texts: give them with --topic-file/--topic, or steer with --companion-push 0")
    elif texts is not None:
        topic = aligner.topic(texts, min_prompts=min_prompts)
    if topic is not None and spec.is_auto and spec.method in STRENGTH_METHODS:
        known = len(topic.extra.get("auto_strength", {}))
        click.echo(aligner.auto_strength(topic, spec).describe(), err=True)
        if scores_path is not None and scores_path.is_dir() and len(topic.extra["auto_strength"]) > known:
            _keep_search(topic, scores_path)
    steered = aligner.generate(prompt_list, topic, spec, seed=seed)
    if as_json:
        for g in steered:
            click.echo(json_line({"prompt": g.prompt, "method": g.method, "mode": g.mode, "strength": g.strength,
                                  "text": g.text, "contamination": g.contamination,
                                  "token_contamination": g.token_contamination}))
        return
    from rich.console import Console

    from saealign.demo import side_by_side

    plain = steered if spec.method == "none" else aligner.generate(prompt_list, topic, spec.unsteered(), seed=seed)
    Console().print(side_by_side(plain, steered, f"layer {aligner.layer}: unsteered vs {spec.method} ({spec.mode})"))


def _read_scores(path: Path, texts: list[str] | None, spec: GenerationSpec) -> TopicScores:
    """``--scores``: a TopicScores folder, or a score CSV (its topic texts, for the auto search, from --topic)."""
    from saealign.reference.authors_csv import read_authors_csv
    from saealign.reference.scoring import TopicScores

    if not path.is_file():
        return TopicScores.load(path)
    topic = read_authors_csv(path)
    if texts:
        topic.topic_texts = texts
    elif spec.is_auto and spec.method in STRENGTH_METHODS:
        raise SaealignError(f"--scores {path} holds scores only, and --strength auto measures distance to the topic "
                            "texts: give --strength NUMBER, or the texts with --topic-file/--topic")
    elif spec.method in ADDITIVE and spec.method not in LATENT_DIRECTIONS:
        raise SaealignError(f"--scores {path} holds scores only, and {spec.method} pushes along the topic texts' mean "
                            "residual: give the texts with --topic-file/--topic")
    elif spec.method in ADDITIVE and (spec.contrast or spec.feedback or spec.output_match):
        option = "contrast" if spec.contrast else "feedback" if spec.feedback else "output-match"
        raise SaealignError(f"--scores {path} holds scores only, and {spec.method} reads the topic texts ({option}): "
                            f"give the texts with --topic-file/--topic, or steer with --no-{option}")
    return topic


def _keep_search(topic: TopicScores, folder: Path) -> None:
    """Save the strength search with the scores so the next run reuses it; a folder holding other files is
    left as it is (saved scores are never worth a user's file)."""
    from saealign.cache import foreign_files

    foreign = foreign_files(folder)
    if foreign:
        click.echo(f"note: the strength search was not saved into {folder}: it holds files saealign did not write "
                   f"({', '.join(foreign[:3])})", err=True)
        return
    topic.save(folder)


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
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; any other than loopback needs --api-key (or --no-auth)")
@click.option("--port", default=8000, show_default=True)
@click.option("--max-new-tokens", "max_new_tokens_limit", default=256, show_default=True, help="per-request limit")
@click.option("--api-key", envvar="SAEALIGN_API_KEY", default=None,
              help="require this key (Authorization: Bearer KEY, as OpenAI clients send it); env SAEALIGN_API_KEY")
@click.option("--no-auth", is_flag=True, help="serve beyond loopback without a key (anyone who can reach it may use it)")
@click.option("--rate-limit", default=300.0, show_default=True, help="requests per client per minute (0: no limit)")
@click.option("--rate-burst", default=60, show_default=True, help="requests a client may send at once")
@click.option("--max-request-tokens", default=4096, show_default=True,
              help="token budget of one request: rows x (longest prompt + new tokens)")
@click.option("--max-batch-tokens", default=8192, show_default=True, help="token budget of one batched model call")
@click.option("--auto-strength", type=click.Choice(["wait", "fallback", "off"]), default="wait", show_default=True,
              help="a request for a topic whose strength search runs: waits, is served at the fallback "
                   "strength (swap/weight 1, add 0.3), or auto is refused (no search)")
@click.option("--max-searches", default=4, show_default=True, help="strength searches running or queued at once")
@friendly
def serve_cmd(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
              max_prompts: int, host: str, port: int, max_new_tokens_limit: int, api_key: str | None, no_auth: bool,
              rate_limit: float, rate_burst: int, max_request_tokens: int, max_batch_tokens: int,
              auto_strength: str, max_searches: int) -> None:
    """Serve aligned generation over HTTP (JSON API, OpenAI-compatible routes, and a page at /).

    Example: saealign serve --port 8000   # then open http://127.0.0.1:8000/
    """
    from saealign.serve.app import ServerLimits, serve
    from saealign.serve.limits import ServerGuard

    if api_key is None and not no_auth and not _is_loopback(host):
        raise SaealignError(f"--host {host} serves beyond this machine: give --api-key KEY (or SAEALIGN_API_KEY), "
                            "or --no-auth to serve without one")
    guard = ServerGuard(api_key=api_key or None, rate_per_minute=rate_limit, rate_burst=rate_burst,
                        max_request_tokens=max_request_tokens, max_batch_tokens=max_batch_tokens,
                        auto_strength=auto_strength, max_searches=max_searches)  # checked before the model loads
    limits = ServerLimits(max_new_tokens=max_new_tokens_limit)
    aligner = load_aligner(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)
    serve(aligner, host=host, port=port, limits=limits, guard=guard)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
