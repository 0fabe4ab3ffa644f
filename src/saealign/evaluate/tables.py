"""The paper's latent-level experiments and the acceptability classifier, each as a :class:`Table`.

``topic_signal_table`` (MedQuAD topic vs MMLU's medical subjects), ``coverage_table`` (Fig. 3),
``topk_table`` (Fig. 4), ``layer_table`` (Fig. 5/6), ``ablation_table`` (appendix A.2) and
``acceptability_table`` (the CoLA classifier behind the ``acceptable`` column). The computations
live in :mod:`saealign.evaluate.experiments`, :mod:`~saealign.evaluate.layer_stats`,
:mod:`~saealign.evaluate.topic_signal` and :mod:`~saealign.evaluate.acceptability`; here they are
run on a :class:`~saealign.evaluate.workbench.Workbench` and shaped for reading.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from saealign.errors import SaealignError
from saealign.evaluate.report import Table, line_plot, scatter_plot
from saealign.evaluate.topics import shared_split, split, topic_texts, unaligned_texts
from saealign.evaluate.workbench import Workbench


def topic_signal_table(bench: Workbench, layers: Sequence[int], max_prompts: int = 20_000, n_topic: int = 50,
                       top: int = 20) -> Table:
    """Top latents of a MedQuAD topic vs MMLU's medical subjects (activation-mass ratio to the base rate)."""
    from saealign.evaluate.topic_signal import medical_mass_ratio

    topic, _ = split(topic_texts(bench.data, "medical"), n_topic, 0)
    rows = []
    for layer in layers:
        index, embedder = bench.loader.index(layer, str(bench.data / "reference" / "mmlu.jsonl.gz"), max_prompts)
        start = time.perf_counter()
        scores = index.score(topic, embedder)
        seconds = time.perf_counter() - start
        rows.append({"layer": layer, **medical_mass_ratio(index, scores, top), "score_seconds": seconds,
                     "top_latents": scores.top(top)})
    return Table("topic_signal", "Topic signal: MedQuAD topic vs MMLU medical subjects", rows,
                 ["layer", "prompts", "medical_prompts", "top_share", "base_share", "ratio", "score_seconds"])


def coverage_table(bench: Workbench, layer: int, samples: int = 5) -> Table:
    """Fig. 3: share of live latents scored (>= 20 prompts) vs reference-set size 2^8..2^17 (min/max bars)."""
    from saealign.evaluate.experiments import coverage_curve

    index = bench.aligner(layer).index
    if index is None:
        raise SaealignError("coverage needs the stack's reference index")
    rows = coverage_curve(index, samples=samples)
    plot = partial(line_plot, series={
        ">= 20 prompts (scored)": [(r["size"], r["scored_mean"], r["scored_min"], r["scored_max"]) for r in rows],
        ">= 1 prompt": [(r["size"], r["active_mean"], r["active_min"], r["active_max"]) for r in rows],
    }, xlabel="reference prompts |P_ref|", ylabel="share of live latents", title=f"coverage, layer {layer}", logx=True)
    return Table("coverage", f"Coverage of live latents vs reference-set size (layer {layer})", rows,
                 ["size", "live", "scored_mean", "scored_min", "scored_max", "active_mean"],
                 f"Index: {index.n_prompts} prompts; live = latents firing on >= 1 prompt of the whole index.",
                 plots={"coverage.png": plot})


def topk_table(bench: Workbench, layers: Sequence[int], topic: str = "medical", n_topic: int = 50,
               n_heldout: int = 100) -> Table:
    """Fig. 4: share of held-out aligned vs unaligned tokens on which a top-k latent fires."""
    from saealign.evaluate.experiments import topk_token_share

    texts, heldout = shared_split(bench.data, topic, n_topic, n_heldout)
    unaligned = unaligned_texts(bench.data, n_heldout)
    rows: list[dict[str, Any]] = []
    series: dict[str, Sequence[tuple[float, float, float, float]]] = {}
    for layer in layers:
        aligner = bench.aligner(layer)
        found = topk_token_share(aligner.sae, aligner.lm, layer, aligner.topic(texts), heldout, unaligned)
        rows += [{"layer": layer, **r} for r in found]
        for kind in ("aligned", "unaligned"):  # one share per k: no bars (low = high = the share)
            series[f"L{layer} {kind}"] = [(r["k"], *(r[f"{kind}_share"],) * 3) for r in found]
    plot = partial(line_plot, series=series, xlabel="k (top latents by score)",
                   ylabel="share of tokens with a top-k latent active", title=f"top-k latents, {topic}", logx=True)
    return Table("topk", f"Top-k latents on held-out {topic} vs unaligned tokens", rows,
                 ["layer", "k", "aligned_share", "unaligned_share", "difference", "aligned_tokens", "unaligned_tokens"],
                 plots={"topk.png": plot})


def layer_table(bench: Workbench, layers: Sequence[int], topic: str = "medical", mode: str = "error",
                n_texts: int = 50) -> Table:
    """Figs. 5/6: latents changed per token (Clamp vs Swap), reconstruction-error change and contamination."""
    from saealign.evaluate.layer_stats import layer_statistics

    texts, heldout = shared_split(bench.data, topic, 50, n_texts)
    by_kind = {"aligned": heldout, "unaligned": unaligned_texts(bench.data, n_texts)}
    rows = []
    for layer in layers:
        aligner = bench.aligner(layer)
        if aligner.index is None:
            raise SaealignError("the layer experiment needs the stack's reference index (Clamp's max activations)")
        found = layer_statistics(aligner.sae, aligner.lm, layer, aligner.topic(texts), aligner.index.latent_max_act,
                                 by_kind, methods=("clamp", "swap"), mode=mode)
        rows += [{"layer": layer, **r, "label": f"L{layer} {r['method']} {r['kind']}"} for r in found]
    for r in rows:
        r["changed_plot"] = max(r["changed_mean"], 1e-3)
    plot = partial(scatter_plot, rows=rows, x="changed_plot", y="contamination", label="label",
                   title="contamination vs latents changed per token")
    return Table("layer", f"Layer-level effect of Clamp vs Swap ({mode} mode, {topic})", rows,
                 ["layer", "method", "kind", "tokens", "changed_mean", "contamination", "contamination_plain",
                  "err_plain_rel", "err_diff_rel", "shift_rel"],
                 "changed = latents whose activation the edit changes per token; err_diff_rel = (|x - dec(a')| - "
                 "|x - dec(a)|) / |x|; shift_rel = |layer output change| / |x|.", plots={"layer.png": plot})


def ablation_table(bench: Workbench, layer: int, topic: str = "medical") -> Table:
    """Appendix A.2: Kendall tau between the summary functions' latent rankings."""
    from saealign.evaluate.experiments import summary_ablation

    texts, _ = shared_split(bench.data, topic, 50, 0)
    aligner = bench.aligner(layer)
    if aligner.index is None or aligner.embedder is None:
        raise SaealignError("the ablation scores the topic: the stack needs its reference index and embedder")
    rows = summary_ablation(aligner.index, texts, aligner.embedder)
    cols = [c for c in rows[0] if c not in ("a", "b")] if rows else []
    return Table("ablation", f"Summary functions: rank agreement of latent scores (layer {layer}, {topic})", rows,
                 ["a", "b", *cols])


def acceptability_table(bench: Workbench, model: str = "default") -> Table:
    """The CoLA acceptability classifier on ``model``'s features (trained once, cached): dev accuracy and MCC."""
    from saealign.evaluate.acceptability import train_acceptability

    folder = bench.data / "acceptability"
    if not folder.is_dir():
        raise SaealignError(f"no CoLA folder at {folder}: pass --data holding acceptability/cola_*.jsonl.gz")
    clf = train_acceptability(bench.model(model, role="model"), folder, max_train=bench.acceptability_max_train)
    rows = [{"split": name, **m, "n": int(m["n"])} for name, m in clf.metrics.items()]  # a count, not 60.000
    return Table("acceptability", f"CoLA acceptability classifier (features of {model}, C={clf.C:g})", rows,
                 ["split", *[k for k in rows[0] if k != "split"]] if rows else ["split"],
                 "Logistic regression on the LM's mean hidden states and token log-probabilities; "
                 "dev = CoLA in-domain + out-of-domain dev sets; MCC = Matthews correlation.")
