"""``saealign eval coverage|topk|layer|ablation|cost|train-acceptability``: the paper's other experiments.

Each writes ``NAME.md`` (a table), ``NAME.csv``/``NAME.json`` (raw rows) and ``NAME.png`` into ``--out``.
The models, SAEs and indexes are the embedded defaults unless the library is used directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from saealign.cli import evaluation as cli_eval
from saealign.cli.app import friendly, parse_layers
from saealign.cli.evaluation import data_option, eval_group
from saealign.errors import SaealignError


def _write(out: Path, name: str, title: str, rows: list[dict[str, Any]], columns: list[str],
           extra: dict[str, Any] | None = None, note: str = "") -> str:
    from saealign.evaluate.report import markdown_table, write_rows

    write_rows(out, name, rows, extra)
    md = f"# {title}\n\n" + (note + "\n\n" if note else "") + markdown_table(rows, columns)
    (out / f"{name}.md").write_text(md)
    click.echo(md)
    return md


def _topic_split(data: Path | None, topic: str, n_topic: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """The same topic/held-out split as the generated-text experiments (200 held out), held-out cut to ``n_heldout``.

    Sharing the split lets ``eval all`` reuse one fine-tuned model and one scored topic across experiments.
    """
    from saealign.evaluate.topics import split, topic_texts

    topic_part, heldout = split(topic_texts(cli_eval._data_dir(data), topic), n_topic, max(n_heldout, 200))
    return topic_part, heldout[:n_heldout]


topic_option = click.option("--topic", "topic_name", default="medical", show_default=True,
                            help="medical, amazon, sycophancy or shoes")


@eval_group.command("coverage")
@click.option("--layer", type=int, default=15, show_default=True)
@click.option("--samples", default=5, show_default=True, help="random subsets per size")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/coverage"), show_default=True)
@friendly
def coverage_cmd(layer: int, samples: int, out: Path) -> None:
    """Figure 3 - share of live latents scored (>= 20 prompts) vs reference-set size 2^8..2^17 (min/max bars).

    Example: saealign eval coverage --layer 15
    """
    from saealign.evaluate.experiments import coverage_curve
    from saealign.evaluate.report import line_plot

    index = cli_eval._aligner_for(layer).index
    assert index is not None
    rows = coverage_curve(index, samples=samples)
    _write(out, "coverage", f"Coverage of live latents vs reference-set size (layer {layer})", rows,
           ["size", "live", "scored_mean", "scored_min", "scored_max", "active_mean"],
           note=f"Index: {index.n_prompts} prompts; live = latents firing on >= 1 prompt of the whole index.")
    line_plot(out / "coverage.png", {
        ">= 20 prompts (scored)": [(r["size"], r["scored_mean"], r["scored_min"], r["scored_max"]) for r in rows],
        ">= 1 prompt": [(r["size"], r["active_mean"], r["active_min"], r["active_max"]) for r in rows],
    }, "reference prompts |P_ref|", "share of live latents", f"coverage, layer {layer}", logx=True)


@eval_group.command("topk")
@click.option("--layers", default="6,15", show_default=True)
@topic_option
@data_option
@click.option("--n-topic", default=50, show_default=True)
@click.option("--n-heldout", default=100, show_default=True, help="held-out topic texts and unaligned texts")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/topk"), show_default=True)
@friendly
def topk_cmd(layers: str, topic_name: str, data: Path | None, n_topic: int, n_heldout: int, out: Path) -> None:
    """Figure 4 - share of held-out aligned vs unaligned tokens on which a top-k latent fires.

    Example: saealign eval topk --layers 15 --topic medical
    """
    from saealign.evaluate.experiments import topk_token_share
    from saealign.evaluate.report import line_plot
    from saealign.evaluate.topics import unaligned_texts

    topic, heldout = _topic_split(data, topic_name, n_topic, n_heldout)
    unaligned = unaligned_texts(cli_eval._data_dir(data), n_heldout)
    rows: list[dict[str, Any]] = []
    series: dict[str, Sequence[tuple[float, float, float, float]]] = {}
    for layer in parse_layers(layers):
        aligner = cli_eval._aligner_for(layer)
        found = topk_token_share(aligner.sae, aligner.lm, layer, aligner.topic(topic), heldout, unaligned)
        rows += [{"layer": layer, **r} for r in found]
        for kind in ("aligned", "unaligned"):  # one share per k: no bars (low = high = the share)
            series[f"L{layer} {kind}"] = [(r["k"], *(r[f"{kind}_share"],) * 3) for r in found]
    _write(out, "topk", f"Top-k latents on held-out {topic_name} vs unaligned tokens", rows,
           ["layer", "k", "aligned_share", "unaligned_share", "difference", "aligned_tokens", "unaligned_tokens"])
    line_plot(out / "topk.png", series, "k (top latents by score)", "share of tokens with a top-k latent active",
              f"top-k latents, {topic_name}", logx=True)


@eval_group.command("layer")
@click.option("--layers", default="6,15", show_default=True)
@topic_option
@data_option
@click.option("--mode", type=click.Choice(["error", "replace"]), default="error", show_default=True)
@click.option("--n-texts", default=50, show_default=True, help="aligned and unaligned texts each")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/layer"), show_default=True)
@friendly
def layer_cmd(layers: str, topic_name: str, data: Path | None, mode: str, n_texts: int, out: Path) -> None:
    """Figures 5/6 - latents changed per token (Clamp vs Swap), reconstruction-error change and contamination.

    Teacher-forced on held-out aligned text and on unaligned text. Example: saealign eval layer --layers 6,15
    """
    from saealign.evaluate.layer_stats import layer_statistics
    from saealign.evaluate.report import scatter_plot
    from saealign.evaluate.topics import unaligned_texts

    topic, heldout = _topic_split(data, topic_name, 50, n_texts)
    texts = {"aligned": heldout, "unaligned": unaligned_texts(cli_eval._data_dir(data), n_texts)}
    rows = []
    for layer in parse_layers(layers):
        aligner = cli_eval._aligner_for(layer)
        assert aligner.index is not None
        max_act = aligner.index.latent_max_act
        found = layer_statistics(aligner.sae, aligner.lm, layer, aligner.topic(topic), max_act, texts,
                                 methods=("clamp", "swap"), mode=mode)
        rows += [{"layer": layer, **r, "label": f"L{layer} {r['method']} {r['kind']}"} for r in found]
    _write(out, "layer", f"Layer-level effect of Clamp vs Swap ({mode} mode, {topic_name})", rows,
           ["layer", "method", "kind", "tokens", "changed_mean", "contamination", "contamination_plain",
            "err_plain_rel", "err_diff_rel", "shift_rel"],
           note="changed = latents whose activation the edit changes per token; err_diff_rel = (|x - dec(a')| - "
                "|x - dec(a)|) / |x|; shift_rel = |layer output change| / |x|.")
    for r in rows:
        r["changed_plot"] = max(r["changed_mean"], 1e-3)
    scatter_plot(out / "layer.png", rows, "changed_plot", "contamination", "label",
                 "contamination vs latents changed per token")


@eval_group.command("ablation")
@click.option("--layer", type=int, default=15, show_default=True)
@topic_option
@data_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/ablation"), show_default=True)
@friendly
def ablation_cmd(layer: int, topic_name: str, data: Path | None, out: Path) -> None:
    """Kendall tau between the summary functions' latent rankings (Weight vs Swap: see ``eval generation``).

    Example: saealign eval ablation --layer 15
    """
    from saealign.evaluate.experiments import summary_ablation

    topic, _ = _topic_split(data, topic_name, 50, 0)
    aligner = cli_eval._aligner_for(layer)
    assert aligner.index is not None and aligner.embedder is not None
    rows = summary_ablation(aligner.index, topic, aligner.embedder)
    cols = [c for c in rows[0] if c not in ("a", "b")] if rows else []
    _write(out, "ablation", f"Summary functions: rank agreement of latent scores (layer {layer}, {topic_name})",
           rows, ["a", "b", *cols])


@eval_group.command("train-acceptability")
@data_option
@click.option("--model", default="default", show_default=True, help="LM whose features the classifier reads")
@click.option("--max-train", type=int, default=None, help="subsample the training sentences")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/acceptability"), show_default=True)
@friendly
def train_acceptability_cmd(data: Path | None, model: str, max_train: int | None, out: Path) -> None:
    """Train (or load from the cache) the CoLA acceptability classifier; report its dev accuracy and MCC.

    Example: saealign eval train-acceptability --data ../shared/data
    """
    from saealign.evaluate.acceptability import train_acceptability
    from saealign.models import load_model

    folder = cli_eval._data_dir(data) / "acceptability"
    if not folder.is_dir():
        raise SaealignError(f"no CoLA folder at {folder}: pass --data holding acceptability/cola_*.jsonl.gz")
    clf = train_acceptability(load_model(model), folder, max_train=max_train)
    rows = [{"split": split, **m, "n": int(m["n"])} for split, m in clf.metrics.items()]  # a count, not 60.000
    _write(out, "acceptability", f"CoLA acceptability classifier (features of {model}, C={clf.C:g})", rows,
           ["split", *[k for k in rows[0] if k != "split"]] if rows else ["split"],
           note="Logistic regression on the LM's mean hidden states and token log-probabilities; "
                "dev = CoLA in-domain + out-of-domain dev sets; MCC = Matthews correlation.")


@eval_group.command("cost")
@click.option("--layer", type=int, default=15, show_default=True)
@data_option
@click.option("--n-topic", default=50, show_default=True)
@click.option("--finetune/--no-finetune", default=True, show_default=True, help="time full and LoRA fine-tuning")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/cost"), show_default=True)
@friendly
def cost_cmd(layer: int, data: Path | None, n_topic: int, finetune: bool, out: Path) -> None:
    """Tables 3/4: set-up, per-topic, per-prompt and per-token cost, against fine-tuning, on this machine.

    Example: saealign eval cost --layer 15
    """
    from saealign.cli.eval_suite import finetuned
    from saealign.evaluate.cost import measure_cost
    from saealign.evaluate.topics import topic_prompts

    topic, _ = _topic_split(data, "medical", n_topic, 0)
    prompts = topic_prompts(cli_eval._data_dir(data), "medical")
    tune = (lambda aligner, method: finetuned(aligner, topic, method)) if finetune else None
    rows = measure_cost(lambda: cli_eval._aligner_for(layer), topic, prompts, finetune=tune)
    _write(out, "cost", f"Cost on this machine (layer {layer})", rows, ["stage", "seconds", "unit", "note"])

