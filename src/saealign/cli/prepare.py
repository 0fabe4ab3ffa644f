"""``saealign info``, ``train-sae`` and ``index build``: what steering needs before the first topic."""

from __future__ import annotations

from pathlib import Path

import click

from saealign.cli.common import friendly, json_line, parse_layers, stack_options
from saealign.errors import SaealignError


@click.command("info")
@click.option("--model", default="default", show_default=True, help="default, gemma3-270m, a folder, a .gguf file or a hub id")
@click.option("--sae", "sae_spec", default="default", show_default=True, help="default[:LAYER], a SAELens folder, params.npz, .pt")
@friendly
def info_cmd(model: str, sae_spec: str) -> None:
    """Print facts about a model and an SAE.

    Example: saealign info --sae default:15
    """
    from saealign.defaults import describe

    click.echo(describe(model, sae_spec))


@click.command("train-sae")
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
    from saealign.models import load_model
    from saealign.reference.corpus_spec import read_corpus
    from saealign.sae.recipe import plan_run
    from saealign.sae.train_config import TrainConfig
    from saealign.sae.training import train_and_save

    cfg = TrainConfig(layers=parse_layers(layers), expansion=expansion, k=k, tokens=tokens, seed=seed)
    corpus = read_corpus(corpus_spec)
    if not 0 < holdout < 1:
        raise SaealignError("--holdout must be between 0 and 1")
    lm = load_model(model)
    run = plan_run(lm, model, corpus_spec, corpus.texts, corpus.fingerprint(), cfg, holdout, eval_texts)
    ckpt = checkpoint_dir or run.checkpoint_dir
    click.echo(f"training on {len(run.train_texts)} texts, evaluating on {len(run.eval_texts)} held-out texts; "
               f"checkpoints in {ckpt}")
    qualities = train_and_save(lm, run.train_texts, run.eval_texts, cfg, out_dir, run.recipe, checkpoint_dir=ckpt)
    for layer, q in qualities.items():
        click.echo(f"layer {layer}: " + json_line({k: round(v, 4) for k, v in q.__dict__.items()}))


@click.group("index")
def index_group() -> None:
    """Build and inspect reference indexes (M1's one-time set-up)."""


@index_group.command("build")
@stack_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="folder (default: the user cache)")
@click.option("--seed", default=0, show_default=True, help="seed of the stratified sample")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="this process, or a Ray cluster (pip install 'saealign[ray]'; docs/scaling.md)")
@click.option("--ray-address", default=None, help="Ray cluster HOST:PORT (default: $RAY_ADDRESS, else a local instance)")
@click.option("--workers", type=int, default=None, help="Ray actors (default: one per GPU, or per CPU)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="model dtype (default: bf16 where the hardware computes it natively, else fp32)")
@friendly
def index_build_cmd(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
                    max_prompts: int, out: Path | None, seed: int, engine: str, ray_address: str | None,
                    workers: int | None, device: str, dtype: str | None) -> None:
    """Build (or resume) the reference index of a corpus; an interrupted build resumes where it stopped.

    Example: saealign index build --corpus ../shared/data/reference/mmlu.jsonl.gz --layer 6 --engine ray
    """
    from saealign.defaults import build_stack_index
    from saealign.reference.workers import BuildEngine

    if index_dir is not None:
        raise click.UsageError("--index names an existing index; use --out to choose where to build")
    how = BuildEngine(kind=engine, device=device, dtype=dtype, ray_address=ray_address, workers=workers)
    index = build_stack_index(model, sae_spec, layer, corpus_spec, max_prompts, seed=seed, folder=out, engine=how)
    live = index.latent_n_prompts > 0
    click.echo(f"index {index.folder}: {index.n_prompts} prompts, layer {index.keys.layer}, {int(live.sum())}/"
               f"{index.d_sae} latents fire on >= 1 prompt, {int((index.latent_n_prompts >= 20).sum())} on >= 20 "
               "(scorable)")
    timings = index.manifest.get("timings", {})
    if timings:
        click.echo("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
