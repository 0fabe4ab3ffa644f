"""``saealign eval coverage|topk|layer|ablation|train-acceptability|cost``: the paper's other experiments.

Each parses its options, calls its function of :mod:`saealign.evaluate.tables` (or
:func:`saealign.evaluate.cost.cost_table`) and writes ``NAME.md`` (a table), ``NAME.csv``/``NAME.json``
(raw rows) and ``NAME.png`` into ``--out``. The models, SAEs and indexes are the embedded defaults.
"""

from __future__ import annotations

from pathlib import Path

import click

from saealign.cli.common import data_option, friendly, parse_layers, workbench
from saealign.evaluate.report import Table, write_table

topic_option = click.option("--topic", "topic_name", default="medical", show_default=True,
                            help="medical, amazon, sycophancy or shoes")


def write(out: Path, table: Table) -> None:
    click.echo(write_table(out, table))


@click.command("coverage")
@click.option("--layer", type=int, default=15, show_default=True)
@click.option("--samples", default=5, show_default=True, help="random subsets per size")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/coverage"), show_default=True)
@friendly
def coverage_cmd(layer: int, samples: int, out: Path) -> None:
    """Figure 3 - share of live latents scored (>= 20 prompts) vs reference-set size 2^8..2^17 (min/max bars).

    Example: saealign eval coverage --layer 15
    """
    from saealign.evaluate.tables import coverage_table

    write(out, coverage_table(workbench(None, need_data=False), layer, samples))


@click.command("topk")
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
    from saealign.evaluate.tables import topk_table

    write(out, topk_table(workbench(data), parse_layers(layers), topic_name, n_topic, n_heldout))


@click.command("layer")
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
    from saealign.evaluate.tables import layer_table

    write(out, layer_table(workbench(data), parse_layers(layers), topic_name, mode, n_texts))


@click.command("ablation")
@click.option("--layer", type=int, default=15, show_default=True)
@topic_option
@data_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/ablation"), show_default=True)
@friendly
def ablation_cmd(layer: int, topic_name: str, data: Path | None, out: Path) -> None:
    """Kendall tau between the summary functions' latent rankings (Weight vs Swap: see ``eval generation``).

    Example: saealign eval ablation --layer 15
    """
    from saealign.evaluate.tables import ablation_table

    write(out, ablation_table(workbench(data), layer, topic_name))


@click.command("train-acceptability")
@data_option
@click.option("--model", default="default", show_default=True, help="LM whose features the classifier reads")
@click.option("--max-train", type=int, default=None, help="subsample the training sentences")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/acceptability"), show_default=True)
@friendly
def train_acceptability_cmd(data: Path | None, model: str, max_train: int | None, out: Path) -> None:
    """Train (or load from the cache) the CoLA acceptability classifier; report its dev accuracy and MCC.

    Example: saealign eval train-acceptability --data ../shared/data
    """
    from saealign.evaluate.tables import acceptability_table

    write(out, acceptability_table(workbench(data, max_train), model))


@click.command("cost")
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
    from saealign.evaluate.cost import cost_table

    write(out, cost_table(workbench(data), layer, n_topic, finetune))


COMMANDS = (coverage_cmd, topk_cmd, layer_cmd, ablation_cmd, train_acceptability_cmd, cost_cmd)
