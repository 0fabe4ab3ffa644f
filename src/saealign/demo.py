"""The main job (``make demo`` / ``saealign demo``): a medical topic steers the paper's metaphor prompts.

On a fresh machine it converts the default model once, builds the default reference index once
(progress bar; cached), scores a medical topic, and prints unsteered vs steered continuations of the
12 medical-metaphor prompts side by side with their contamination, steered by the library's default
(:data:`~saealign.steering.spec.DEFAULT_METHOD` at its default strength). A second run reuses every cache.
"""

from __future__ import annotations

import random
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from saealign.defaults import PACKAGE_DATA, TOPICS_DIR, shared_data_dir
from saealign.reference.text_files import read_topic
from saealign.steering.aligner import Aligner, Generation
from saealign.steering.spec import GenerationSpec

PACKAGE_PROMPTS = PACKAGE_DATA / "neutral_prompts.txt"
N_TOPIC_TEXTS = 50


def demo_topic(seed: int = 0) -> tuple[list[str], str]:
    """50 MedQuAD answers when ``../shared/data`` is present, else the package's own medical examples."""
    shared = shared_data_dir()
    medquad = shared / "topics" / "medical_medquad.jsonl.gz" if shared else None
    if medquad is not None and medquad.exists():
        texts = read_topic([medquad])
        n = min(N_TOPIC_TEXTS, len(texts))
        return random.Random(seed).sample(texts, n), f"{n} texts of {medquad.name}"
    path = TOPICS_DIR / "medical.txt"
    return read_topic([path]), f"{path.name} (package example)"


def demo_prompts() -> tuple[list[str], str]:
    """The paper's 12 medical-metaphor prompts when the shared data is present, else neutral openings."""
    shared = shared_data_dir()
    metaphors = shared / "topics" / "medical_metaphors.txt" if shared else None
    if metaphors is not None and metaphors.exists():
        return read_topic([metaphors]), "the paper's medical-metaphor prompts"
    return read_topic([PACKAGE_PROMPTS]), "neutral prompts (shared data not found)"


def side_by_side(plain: list[Generation], steered: list[Generation], title: str) -> Table:
    """A table: prompt | unsteered | steered, with each generation's mean contamination."""
    table = Table(title=title, show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("unsteered", ratio=2)
    table.add_column(f"{steered[0].method} ({steered[0].mode}, strength {steered[0].strength:g})", ratio=2)
    for p, s in zip(plain, steered, strict=True):
        table.add_row(escape(p.prompt), _cell(p), _cell(s))
    return table


def _cell(g: Generation) -> str:
    measured = "" if g.contamination is None else f"\n[dim]contamination {g.contamination:.3f}[/dim]"
    return escape(g.text.strip()) + measured


def run_demo(layer: int | None = None, max_new_tokens: int = 64, seed: int = 0, console: Console | None = None) -> None:
    console = console or Console()
    start = time.perf_counter()
    aligner = Aligner.default(layer=layer)
    index = aligner.index
    assert index is not None  # Aligner.default always builds one
    console.print(f"[bold]model[/bold] SmolLM2-135M-Instruct, [bold]SAE[/bold] layer {aligner.layer} "
                  f"({aligner.sae.d_sae} latents), [bold]index[/bold] {index.n_prompts} WordNet prompts "
                  f"-- ready in {time.perf_counter() - start:.1f} s")
    texts, topic_name = demo_topic(seed)
    t0 = time.perf_counter()
    topic = aligner.topic(texts)
    console.print(f"scored {topic.d_sae} latents against {topic_name} in {time.perf_counter() - t0:.2f} s; top latents:")
    for i in topic.top(5):
        examples = "; ".join(t[:70] for t, _ in index.top_texts(i, 2))
        console.print(f"  latent {i:5d}  score {topic.scores[i]:.3f}  g {topic.g[i]:.3f}  fires on: {examples}")
    prompts, prompts_name = demo_prompts()
    # the library's default: the additive method at its default strength
    default = GenerationSpec(max_new_tokens=max_new_tokens, top_k=5)
    t0 = time.perf_counter()
    unsteered = default.unsteered()
    plain = aligner.generate(prompts, topic, unsteered, seed=seed)
    steered = aligner.generate(prompts, topic, default, seed=seed)
    seconds = time.perf_counter() - t0
    console.print(side_by_side(plain, steered, f"{prompts_name}: unsteered vs the default ({max_new_tokens} tokens, "
                                               f"top-k 5, temperature {unsteered.heat:g} and "
                                               f"{default.heat:g})"))
    mean = lambda gs: sum(g.contamination or 0.0 for g in gs) / len(gs)  # noqa: E731
    console.print(f"mean contamination: unsteered {mean(plain):.3f}, {default.method} {mean(steered):.3f}; "
                  f"generation took {seconds:.1f} s for {2 * len(prompts)} continuations")
