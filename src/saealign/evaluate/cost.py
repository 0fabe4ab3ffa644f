"""What saealign costs on this machine (the paper's Tables 3 and 4), next to fine-tuning.

Stages: set-up once per model/SAE (load; the reference index build, read from the index's own
timings), once per topic (scoring, the automatic strength search), and per generation (plain vs
Swap, per prompt and per token, same batch, same process), against fine-tuning the model on the
same topic texts (LoRA and full, the standard recipe of :mod:`saealign.evaluate.finetune`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from saealign.evaluate.report import Table
from saealign.evaluate.workbench import Workbench
from saealign.steering.aligner import Aligner
from saealign.steering.spec import GenerationSpec

if TYPE_CHECKING:
    from saealign.evaluate.finetune import FineTuned


def _row(stage: str, seconds: float, unit: str, note: str = "") -> dict[str, Any]:
    return {"stage": stage, "seconds": seconds, "unit": unit, "note": note}


def measure_cost(make_aligner: Callable[[], Aligner], topic_texts: list[str], prompts: list[str],
                 max_new_tokens: int = 64, finetune: Callable[[Aligner, str], FineTuned] | None = None
                 ) -> list[dict[str, Any]]:
    """Rows ``{stage, seconds, unit, note}``; every figure is measured in this call except the index build.

    ``finetune(aligner, "lora" | "full")`` returns a timed fine-tuning of the model on ``topic_texts``
    (``eval all`` passes one that reuses the models its generation experiments trained).
    """
    aligner = make_aligner()  # may be one the process already built: report the model's own load time
    rows = [_row("load model (converted copy in the user cache)", aligner.lm.load_seconds, "once per process",
                 "the first load of the default model converts its GGUF once into the user cache")]
    if aligner.index is not None:
        timings = aligner.index.manifest.get("timings") or {}
        stage = f"build reference index ({aligner.index.n_prompts} prompts)"
        if timings:
            rows.append(_row(stage, sum(float(v) for v in timings.values()), "once per model/SAE/layer",
                             "measured when the index was built: "
                             + ", ".join(f"{k} {float(v):.1f} s" for k, v in timings.items())))
        else:  # an index written before builds were timed: say so rather than report 0 s
            rows.append(_row(stage, float("nan"), "once per model/SAE/layer", "not recorded by this index"))
    t = time.perf_counter()
    topic = aligner.topic(topic_texts)
    rows.append(_row(f"score a topic ({len(topic_texts)} texts)", time.perf_counter() - t, "per topic",
                     "MiniLM embeddings + sparse products; the LLM does not run"))
    t = time.perf_counter()
    choice = aligner.auto_strength(topic)
    rows.append(_row("automatic strength search", time.perf_counter() - t, "per topic", choice.describe()))
    per_token = {}
    for method in ("none", "swap"):
        t = time.perf_counter()
        spec = GenerationSpec(method, strength=1.0, max_new_tokens=max_new_tokens)
        gens = aligner.generate(prompts, topic if method != "none" else None, spec, seed=0)
        seconds = time.perf_counter() - t
        # rows that end early still ride along in the batch: the cost is per batch step, i.e. per token slot
        slots = max(len(g.token_ids) for g in gens) * len(prompts)
        per_token[method] = seconds / slots
        label = "plain generation" if method == "none" else "Swap generation"
        rows.append(_row(f"{label}, batch {len(prompts)}", seconds / len(prompts), "per prompt",
                         f"up to {max_new_tokens} new tokens, {slots} token slots in {seconds:.1f} s"))
        rows.append(_row(f"{label}, batch {len(prompts)}", seconds / slots, "per token slot", ""))
    rows[-1]["note"] = f"steered / plain = {per_token['swap'] / per_token['none']:.3f}x"
    for method in ("lora", "full"):
        if finetune is not None:
            tuned = finetune(aligner, method)
            rows.append(_row(f"fine-tune ({method}, {tuned.config.epochs} epochs)", tuned.seconds, "per topic",
                             f"{tuned.tokens_seen} tokens, final loss {tuned.losses[-1]:.3f}"))
    return rows


def cost_table(bench: Workbench, layer: int, n_topic: int = 50, finetune: bool = True) -> Table:
    """Tables 3/4 on this machine for the medical topic: :func:`measure_cost` with the workbench's stack.

    Fine-tuning reuses what the generated-text experiments tuned on the same topic texts (same workbench).
    """
    from saealign.evaluate.topics import shared_split, topic_prompts

    topic, _ = shared_split(bench.data, "medical", n_topic, 0)
    prompts = topic_prompts(bench.data, "medical")
    tune = (lambda aligner, method: bench.finetuned(aligner, topic, method, label="medical")) if finetune else None
    rows = measure_cost(lambda: bench.aligner(layer), topic, prompts, finetune=tune)
    return Table("cost", f"Cost on this machine (layer {layer})", rows, ["stage", "seconds", "unit", "note"])
