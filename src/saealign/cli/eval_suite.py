"""The generated-text experiments behind ``eval generation``, ``eval frontier`` and ``eval all``.

``generation_table``: the paper's Table 2 (methods x modes x layers, plus prompting and fine-tuning
baselines) on the medical topic. ``frontier_table``: topic distance vs judge perplexity for Swap at
fixed strengths, ``auto``, Clamp, prompting and LoRA, on several topics (issue: automatic strength).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from saealign.cli import evaluation as cli_eval
from saealign.errors import SaealignError
from saealign.evaluate.conditions import Condition, ConditionInputs, gap_closed, run_conditions
from saealign.evaluate.report import markdown_table, scatter_plot, write_rows
from saealign.evaluate.topics import TOPICS, split, topic_prompts, topic_texts

if TYPE_CHECKING:
    from saealign.evaluate.finetune import FineTuned
    from saealign.models import LoadedModel
    from saealign.reference.embed import TextEmbedder
    from saealign.steering.aligner import Aligner

BASELINES = ("prompt", "lora", "full")
ACCEPTABILITY_MAX_TRAIN = "saealign.acceptability_max_train"
"""``click.Context.meta`` key: the CoLA subsample size the acceptability metric's classifier uses."""
_FINETUNED: dict[tuple[str, str, str], FineTuned] = {}
"""Fine-tuned models by (model key, texts hash, method): ``eval all`` trains each once and reuses it."""


@dataclass
class SuiteOptions:
    """What every generated-text experiment shares."""

    data: Path
    judge: LoadedModel
    embedder: TextEmbedder
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 64
    n_topic: int = 50
    n_heldout: int = 200
    max_prompts: int | None = None
    """Use only the first N test prompts (``--quick``)."""
    acceptability: Any = None
    """A function texts -> share acceptable, or None."""
    finetune_epochs: int = 3
    timings: dict[str, float] = field(default_factory=dict)
    """Fine-tuning wall times, filled as models are tuned (for the cost table)."""


def finetuned(aligner: Aligner, texts: list[str], method: str, epochs: int = 3) -> FineTuned:
    """``aligner``'s model fine-tuned on ``texts`` (trained once per process, then reused)."""
    from saealign.cache import hash_json
    from saealign.evaluate.finetune import FineTuneConfig, finetune

    key = (aligner.lm.key, hash_json([texts, epochs]), method)
    if key not in _FINETUNED:
        click.echo(f"fine-tuning ({method}) on {len(texts)} topic texts...", err=True)
        _FINETUNED[key] = finetune(aligner.lm, texts, FineTuneConfig(method=method, epochs=epochs))  # type: ignore[arg-type]
    return _FINETUNED[key]


def _once_per_layer(aligner_for: Any) -> Any:
    """``aligner_for`` remembered per layer: the default stack loads its model on every call."""
    made: dict[int, Aligner] = {}

    def get(layer: int) -> Aligner:
        if layer not in made:
            made[layer] = aligner_for(layer)
        return made[layer]

    return get


def topic_inputs(data: Path, topic: str, n_topic: int, n_heldout: int, max_prompts: int | None = None
                 ) -> tuple[list[str], list[str], list[str]]:
    """``(topic texts, held-out texts, prompts)`` of one evaluation topic; errors before any model loads."""
    texts, heldout = split(topic_texts(data, topic), n_topic, n_heldout)
    return texts, heldout, topic_prompts(data, topic)[: max_prompts or None]


def _inputs(aligner_for: Any, layer: int, topic: str, baselines: tuple[str, ...], opts: SuiteOptions
            ) -> tuple[ConditionInputs, list[str]]:
    from saealign.steering.aligner import Aligner

    texts, heldout, prompts = topic_inputs(opts.data, topic, opts.n_topic, opts.n_heldout, opts.max_prompts)
    inputs = ConditionInputs(prompts, texts, heldout, opts.judge, opts.embedder, opts.seeds, opts.max_new_tokens,
                             instruction=TOPICS[topic].instruction, acceptability=opts.acceptability)
    for method in ("lora", "full"):
        if method in baselines:
            base = aligner_for(layer)
            tuned = finetuned(base, texts, method, opts.finetune_epochs)
            opts.timings[f"fine-tune {method} ({topic})"] = tuned.seconds
            inputs.finetuned[method] = Aligner(tuned.lm, base.sae, layer)
    return inputs, texts


def _baseline_conditions(layer: int, baselines: tuple[str, ...]) -> list[Condition]:
    out = [Condition(kind="prompt", layer=layer)] if "prompt" in baselines else []
    return out + [Condition(kind="finetune", layer=layer, finetune=m) for m in ("lora", "full") if m in baselines]


def _add_relative(rows: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """``gap_closed`` (share of the none -> real-topic-text distance gap) and ``ppl_ratio`` vs unsteered."""
    none = next(r for r in rows if r["kind"] == "steer" and r["method"] == "none")
    for r in rows:
        r["gap_closed"] = gap_closed(r["distance"], none["distance"], reference["real_topic_text_distance"])
        r["ppl_ratio"] = r["ppl"] / none["ppl"]


def generation_table(aligner_for: Any, layers: tuple[int, ...], methods: tuple[str, ...], modes: tuple[str, ...],
                     strengths: tuple[float | str, ...], baselines: tuple[str, ...], opts: SuiteOptions,
                     out: Path, topic: str = "medical") -> list[dict[str, Any]]:
    """Table 2 on ``topic``; writes generation.{md,json,csv,png} into ``out``."""
    from saealign.evaluate.generation import GenerationSetup, setup_conditions

    aligner_for = _once_per_layer(aligner_for)
    setup = GenerationSetup(methods=methods, modes=modes, seeds=opts.seeds, strengths=strengths,
                            max_new_tokens=opts.max_new_tokens)
    conditions = setup_conditions(layers, setup) + _baseline_conditions(layers[-1], baselines)
    inputs, _ = _inputs(aligner_for, layers[-1], topic, baselines, opts)
    rows, reference = run_conditions(conditions, aligner_for, inputs)
    _add_relative(rows, reference)
    write_rows(out, "generation", rows, {"reference": reference, "setup": setup.__dict__, "timings": opts.timings})
    cols = ["label", "distance", "gap_closed", "ppl", "ppl_ratio", "acceptable", "contamination", "distinct2",
            "changed", "strength_used"]
    md = (f"# Generated text ({topic}): {len(inputs.prompts)} prompts, {opts.max_new_tokens} tokens, top-k 5, "
          f"seeds {','.join(map(str, opts.seeds))}\n\n"
          f"distance: mean min MiniLM distance to {len(inputs.heldout_texts)} held-out {topic} texts (real {topic} "
          f"text: {reference['real_topic_text_distance']:.3f}); gap_closed: share of the distance between unsteered "
          f"and real topic text removed; ppl: judge perplexity ({opts.judge.name}); acceptable: CoLA classifier.\n\n"
          + markdown_table(rows, [c for c in cols if c in rows[0]]))
    (out / "generation.md").write_text(md)
    scatter_plot(out / "generation.png", rows, "ppl", "distance", "label", f"{topic}: topic distance vs judge perplexity",
                 hline=reference["real_topic_text_distance"], hline_label=f"real {topic} text")
    click.echo(md)
    return rows


def frontier_table(aligner_for: Any, layer: int, topics: tuple[str, ...], strengths: tuple[float, ...],
                   baselines: tuple[str, ...], opts: SuiteOptions, out: Path) -> list[dict[str, Any]]:
    """Per topic: none, Swap at each strength, Swap auto, Clamp, Swap auto on generated positions only, and the
    baselines; writes frontier.* into ``out``."""
    aligner_for = _once_per_layer(aligner_for)
    all_rows: list[dict[str, Any]] = []
    summary = []
    for topic in topics:
        conditions = ([Condition(layer=layer)]
                      + [Condition(layer=layer, method="swap", strength=s) for s in strengths]
                      + [Condition(layer=layer, method="swap", strength="auto"),
                         Condition(layer=layer, method="clamp", mode="replace"),
                         # beyond the paper: edit only the positions that predict new tokens
                         Condition(layer=layer, method="swap", strength="auto", steer_prompt=False)]
                      + _baseline_conditions(layer, baselines))
        inputs, _ = _inputs(aligner_for, layer, topic, baselines, opts)
        rows, reference = run_conditions(conditions, aligner_for, inputs)
        _add_relative(rows, reference)
        for r in rows:
            r["topic"] = topic
            r["real_distance"] = reference["real_topic_text_distance"]
        all_rows += rows
        auto = next(r for r in rows if r["strength"] == "auto")
        summary.append({"topic": topic, "auto_strength": auto["strength_used"], "gap_closed": auto["gap_closed"],
                        "ppl_ratio": auto["ppl_ratio"],
                        "meets_target": bool(auto["gap_closed"] >= 0.5 and auto["ppl_ratio"] <= 1.15)})
        scatter_plot(out / f"frontier_{topic}.png", rows, "ppl", "distance", "label",
                     f"{topic}: topic distance vs judge perplexity (layer {layer})",
                     hline=reference["real_topic_text_distance"], hline_label=f"real {topic} text")
    write_rows(out, "frontier", all_rows, {"summary": summary, "timings": opts.timings})
    cols = ["topic", "label", "strength_used", "distance", "gap_closed", "ppl", "ppl_ratio", "contamination",
            "distinct2"]
    if opts.acceptability is not None:
        cols.insert(-2, "acceptable")
    md = ("# Topic vs fluency frontier\n\nTarget: `auto` closes >= 50 % of the distance gap between unsteered and real "
          "topic text at <= +15 % judge perplexity.\n\n" + markdown_table(summary, list(summary[0]))
          + "\n" + markdown_table(all_rows, cols))
    (out / "frontier.md").write_text(md)
    click.echo(md)
    return all_rows


def suite_options(data: Path | None, judge: str, seeds: str, max_new_tokens: int, n_topic: int, n_heldout: int,
                  acceptability: bool, max_prompts: int | None = None) -> SuiteOptions:
    """Load the judge, embedder and (when asked and possible) the acceptability classifier."""
    from saealign.models import load_model
    from saealign.reference.embed import Embedder

    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise SaealignError("--seeds takes integers separated by commas (e.g. 0,1,2)") from None
    root = cli_eval._data_dir(data)
    try:
        judge_lm = load_model(judge)
    except SaealignError as e:
        raise SaealignError(f"cannot load the judge model {judge!r} ({e}): pass --judge with a loadable model") from None
    opts = SuiteOptions(root, judge_lm, Embedder.default(), seed_list, max_new_tokens, n_topic, n_heldout, max_prompts)
    if acceptability:
        from saealign.evaluate.acceptability import acceptability_rate, train_acceptability

        # the classifier reads the default model's features (trained once, cached); `eval all --quick`
        # subsamples its training set and says so here, so its experiments reuse that classifier
        ctx = click.get_current_context(silent=True)
        max_train = ctx.meta.get(ACCEPTABILITY_MAX_TRAIN) if ctx is not None else None
        feature_lm = load_model("default")
        clf = train_acceptability(feature_lm, root / "acceptability", max_train=max_train)
        opts.acceptability = lambda texts: acceptability_rate(clf, feature_lm, texts)
    return opts


def parse_strengths(text: str) -> tuple[float | str, ...]:
    """``--strengths``: numbers >= 0 and/or ``auto``, separated by commas."""
    out: list[float | str] = []
    for s in text.split(","):
        s = s.strip()
        if s == "auto":
            out.append(s)
            continue
        try:
            value = float(s)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value >= 0):
            raise SaealignError(f"--strengths takes numbers >= 0 or auto separated by commas, got {s!r}")
        out.append(value)
    return tuple(dict.fromkeys(out))


def parse_baselines(text: str) -> tuple[str, ...]:
    found = tuple(b for b in text.split(",") if b)
    bad = [b for b in found if b not in BASELINES]
    if bad:
        raise SaealignError(f"unknown baseline {', '.join(bad)}: use some of {', '.join(BASELINES)} (or '')")
    return found
