"""The ``saealign`` command: a thin layer that parses, calls the library and prints.

User mistakes surface as one line (``SaealignError`` -> ``click.ClickException``), never a traceback.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from saealign.errors import SaealignError

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn SaealignError (and a missing file) into one clean error line with exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SaealignError as e:
            raise click.ClickException(str(e)) from None
        except FileNotFoundError as e:
            raise click.ClickException(f"file not found: {e.filename}") from None

    return wrapper  # type: ignore[return-value]


def parse_layers(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layers as integers separated by commas, e.g. 6,15") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saealign")
def main() -> None:
    """Align a language model's generations to any topic by editing a sparse autoencoder inside it."""


@main.command("info")
@click.option("--model", default="default", show_default=True, help="default, gemma3-270m, a folder, a .gguf file or a hub id")
@click.option("--sae", "sae_spec", default="default", show_default=True, help="default[:LAYER], a SAELens folder, params.npz, .pt")
@friendly
def info_cmd(model: str, sae_spec: str) -> None:
    """Print facts about a model and an SAE.

    Example: saealign info --sae default:15
    """
    from saealign.defaults import describe

    click.echo(describe(model, sae_spec))


@main.command("train-sae")
@click.option("--model", default="default", show_default=True, help="model to read activations from")
@click.option("--corpus", "corpus_spec", required=True, help="corpus spec: files/folders/wordnet, comma-joined")
@click.option("--layers", default="6", show_default=True, help="blocks to train SAEs for, e.g. 6,15 (one forward pass feeds all)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="folder: one layer_L/ SAELens folder per layer")
@click.option("--tokens", default=2_000_000, show_default=True, help="training tokens")
@click.option("--expansion", default=8, show_default=True, help="d_sae = expansion x d_model")
@click.option("--k", default=32, show_default=True, help="active latents per token")
@click.option("--holdout", default=0.05, show_default=True, help="share of texts held out for evaluation")
@click.option("--eval-texts", default=500, show_default=True, help="held-out texts used for the reported figures")
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None,
              help="resume folder (default: in the user cache, keyed by the run's settings)")
@friendly
def train_sae_cmd(model: str, corpus_spec: str, layers: str, out_dir: Path, tokens: int, expansion: int, k: int,
                  holdout: float, eval_texts: int, seed: int, checkpoint_dir: Path | None) -> None:
    """Train TopK SAEs on a model's residual stream (checkpointed: rerun the same command to resume).

    Example: saealign train-sae --corpus ../shared/data/reference,../shared/data/topics --layers 6,15 --out saes
    """
    from saealign.cache import cache_dir, hash_json
    from saealign.models import load_model
    from saealign.reference.corpus import read_corpus
    from saealign.sae.training import TrainConfig, train_and_save

    cfg = TrainConfig(layers=parse_layers(layers), expansion=expansion, k=k, tokens=tokens, seed=seed)
    corpus = read_corpus(corpus_spec)
    if not 0 < holdout < 1:
        raise SaealignError("--holdout must be between 0 and 1")
    order = list(range(len(corpus)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, int(len(order) * holdout))
    held, train = order[:n_hold], order[n_hold:]
    lm = load_model(model)
    train_texts = [corpus.texts[i] for i in train]
    eval_texts_list = [corpus.texts[i] for i in held[:eval_texts]]
    recipe = {
        "model": model, "model_key": lm.key, "corpus": corpus_spec, "corpus_fingerprint": corpus.fingerprint(),
        "corpus_texts": len(corpus), "holdout_fraction": holdout, "eval_texts": len(eval_texts_list),
        "dtype": str(next(lm.model.parameters()).dtype),
    }
    key = hash_json({"recipe": recipe, "cfg": repr(cfg)})
    ckpt = checkpoint_dir or cache_dir("train", key)
    click.echo(f"training on {len(train_texts)} texts, evaluating on {len(eval_texts_list)} held-out texts; checkpoints in {ckpt}")
    qualities = train_and_save(lm, train_texts, eval_texts_list, cfg, out_dir, recipe, checkpoint_dir=ckpt)
    for layer, q in qualities.items():
        click.echo(f"layer {layer}: " + json.dumps({k: round(v, 4) for k, v in q.__dict__.items()}))


# -- shared options: which model, SAE, layer and reference index ---------------------------------
def stack_options(fn: F) -> F:
    """--model/--sae/--layer/--index/--corpus/--max-prompts, shared by index, score and generate."""
    from saealign.defaults import DEFAULT_INDEX_PROMPTS

    options = [
        click.option("--model", default="default", show_default=True, help="default, gemma3-270m, folder, .gguf or hub id"),
        click.option("--sae", "sae_spec", default="default", show_default=True, help="default[:LAYER], SAELens folder, params.npz, .pt"),
        click.option("--layer", type=int, default=None, help="block the SAE reads (default: the SAE's own, else 15)"),
        click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None, help="an existing index folder"),
        click.option("--corpus", "corpus_spec", default=None, help="reference corpus spec (default: WordNet sample)"),
        click.option("--max-prompts", default=DEFAULT_INDEX_PROMPTS, show_default=True, help="stratified sample size of the corpus"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _stack(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
           max_prompts: int) -> tuple[Any, Any, int, Any, Any]:
    from saealign.defaults import load_stack

    return load_stack(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)


@main.group("index")
def index_group() -> None:
    """Build and inspect reference indexes (M1's one-time set-up)."""


@index_group.command("build")
@stack_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="folder (default: the user cache)")
@click.option("--seed", default=0, show_default=True, help="seed of the stratified sample")
@friendly
def index_build_cmd(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
                    max_prompts: int, out: Path | None, seed: int) -> None:
    """Build (or resume) the reference index of a corpus; an interrupted build resumes where it stopped.

    Example: saealign index build --corpus ../shared/data/reference/mmlu.jsonl.gz --layer 6
    """
    from saealign.defaults import default_corpus_spec, index_folder, resolve_sae
    from saealign.models import load_model
    from saealign.reference.corpus import read_corpus, sample
    from saealign.reference.embed import Embedder
    from saealign.reference.index import IndexConfig, build_index

    if index_dir is not None:
        raise click.UsageError("--index names an existing index; use --out to choose where to build")
    if sae_spec == "default" and layer is not None:
        sae_spec = f"default:{layer}"
    lm = load_model(model)
    sae = resolve_sae(sae_spec)
    layer = layer if layer is not None else sae.cfg.hook_layer
    if layer is None:
        raise SaealignError("this SAE does not say which layer it reads: pass --layer")
    corpus = read_corpus(corpus_spec or default_corpus_spec())
    if len(corpus) > max_prompts:
        corpus = sample(corpus, max_prompts, seed=seed)
    folder = out or index_folder(lm, sae, layer, corpus)
    index = build_index(lm, sae, corpus, Embedder.default(), folder, IndexConfig(layer=layer))
    live = index.latent_n_prompts > 0
    click.echo(f"index {folder}: {index.n_prompts} prompts, layer {layer}, {int(live.sum())}/{index.d_sae} latents fire "
               f"on >= 1 prompt, {int((index.latent_n_prompts >= 20).sum())} on >= 20 (scorable)")
    timings = index.manifest.get("timings", {})
    if timings:
        click.echo("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


def _read_topic_texts(topic_files: tuple[str, ...], topic_texts: tuple[str, ...]) -> list[str]:
    from saealign.reference.corpus import read_topic

    if not topic_files and not topic_texts:
        raise SaealignError("give the topic: --topic-file FILE (one example text a line) and/or --topic TEXT")
    return read_topic(list(topic_files), list(topic_texts))


@main.command("score")
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
    import time

    texts = _read_topic_texts(topic_files, topic_texts)
    _lm, _sae, layer_used, index, embedder = _stack(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)
    start = time.perf_counter()
    scores = index.score(texts, embedder, summary=summary, metric=metric, min_prompts=min_prompts)
    seconds = time.perf_counter() - start
    if output is not None:
        scores.save(output)
    rows = [
        {"latent": i, "score": float(scores.scores[i]), "g": float(scores.g[i]), "prompts": int(scores.n_prompts[i]),
         "examples": [t for t, _ in index.top_texts(i, examples)]}
        for i in scores.top(top)
    ]
    if as_json:
        click.echo(json.dumps({"layer": layer_used, "topic_texts": len(texts), "seconds": seconds, "note": scores.note,
                               "scored": int(scores.scored.sum()), "top": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top {top} latents for the topic ({len(texts)} texts, layer {layer_used}, scored in {seconds:.3f} s)")
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


METHODS = ("none", "sae", "clamp", "swap", "weight")
MODES = ("error", "replace")


def parse_strength(text: str) -> float | str:
    """``auto`` or a non-negative number (the ``--strength`` option)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise SaealignError(f"--strength takes a number or auto, got {text!r}") from None
    if not value >= 0:
        raise SaealignError(f"--strength must be >= 0, got {text}")
    return value


@main.command("generate")
@stack_options
@click.argument("prompts", nargs=-1)
@click.option("--topic-file", "topic_files", multiple=True, help="topic texts, one a line (txt or jsonl); repeatable")
@click.option("--topic", "topic_texts", multiple=True, help="a topic text; repeatable")
@click.option("--scores", "scores_path", type=click.Path(path_type=Path), default=None, help="a TopicScores folder (saealign score -o)")
@click.option("--method", type=click.Choice(METHODS), default="swap", show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="error", show_default=True,
              help="error: keep the SAE's reconstruction error; replace: layer output = SAE decode (the paper)")
@click.option("--strength", default="auto", show_default=True,
              help="Swap/Weight use scores**strength (1 = the paper); auto: the strongest within +15 %% perplexity")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--top-k", default=5, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--greedy", is_flag=True, help="argmax decoding instead of top-k sampling")
@click.option("--chat/--no-chat", default=False, show_default=True, help="wrap prompts in the model's chat template")
@click.option("--prompts-file", type=click.Path(path_type=Path), default=None, help="prompts, one a line")
@click.option("--min-prompts", default=20, show_default=True, help="latents firing on fewer reference prompts are unscored")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line instead of a side-by-side view")
@friendly
def generate_cmd(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
                 max_prompts: int, prompts: tuple[str, ...], topic_files: tuple[str, ...], topic_texts: tuple[str, ...],
                 scores_path: Path | None, method: str, mode: str, strength: str, max_new_tokens: int, top_k: int,
                 temperature: float, seed: int, greedy: bool, chat: bool, prompts_file: Path | None,
                 min_prompts: int, as_json: bool) -> None:
    """Generate continuations steered toward a topic (M2), with per-token contamination.

    Example: saealign generate --topic-file src/saealign/data/topics/medical.txt "My heart is broken, so I should"
    """
    from saealign.reference.corpus import read_topic
    from saealign.reference.scoring import TopicScores
    from saealign.steering.aligner import Aligner

    prompt_list = list(prompts) + (read_topic([prompts_file]) if prompts_file else [])
    if not prompt_list:
        raise SaealignError("give at least one prompt (arguments or --prompts-file)")
    if max_new_tokens < 1:
        raise SaealignError("--max-new-tokens must be at least 1")
    strength_value = parse_strength(strength)
    lm, sae, layer_used, index, embedder = _stack(model, sae_spec, layer, index_dir, corpus_spec, max_prompts)
    aligner = Aligner(lm, sae, layer_used, index, embedder)
    topic = None
    if scores_path is not None:
        topic = TopicScores.load(scores_path)
    elif topic_files or topic_texts:
        topic = aligner.topic(_read_topic_texts(topic_files, topic_texts), min_prompts=min_prompts)
    elif method != "none":
        raise SaealignError(f"--method {method} needs a topic: --topic-file, --topic or --scores")
    options = dict(topic=topic, mode=mode, strength=strength_value, max_new_tokens=max_new_tokens, top_k=top_k,
                   temperature=temperature, seed=seed, greedy=greedy, chat=chat)
    if topic is not None and strength_value == "auto" and method in ("swap", "weight"):
        known = len(topic.extra.get("auto_strength", {}))
        click.echo(aligner.auto_strength(topic, method, mode).describe(), err=True)
        if scores_path is not None and len(topic.extra["auto_strength"]) > known:
            topic.save(scores_path)  # keep the search with the scores: the next run reuses it
    steered = aligner.generate(prompt_list, method=method, **options)  # type: ignore[arg-type]
    if as_json:
        for g in steered:
            click.echo(json.dumps({"prompt": g.prompt, "method": g.method, "mode": g.mode, "strength": g.strength,
                                   "text": g.text, "contamination": g.contamination,
                                   "token_contamination": g.token_contamination}))
        return
    from rich.console import Console

    from saealign.demo import side_by_side

    plain = steered if method == "none" else aligner.generate(prompt_list, method="none", **options)  # type: ignore[arg-type]
    Console().print(side_by_side(plain, steered, f"layer {layer_used}: unsteered vs {method} ({mode})"))


@main.command("demo")
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


@main.command("serve")
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
    from saealign.steering.aligner import Aligner

    aligner = Aligner(*_stack(model, sae_spec, layer, index_dir, corpus_spec, max_prompts))
    serve(aligner, host=host, port=port, limits=ServerLimits(max_new_tokens=max_new_tokens_limit))


# The eval group lives in its own module; importing it registers its commands on ``main``.
from saealign.cli import evaluation  # noqa: E402,F401
