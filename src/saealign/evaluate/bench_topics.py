"""The steering benchmark's topics: groups of at least four topics, each group from one public dataset.

A topic is a label set of its dataset (MMLU subjects, CLINC150 domains, Amazon review domains); its
``align`` texts are what a user would give saealign (30 by default), its ``heldout`` texts train and test
the group's classifier and never reach the steering. Splits are seeded and disjoint, texts de-duplicated.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from saealign.errors import SaealignError


@dataclass(frozen=True)
class TopicDef:
    name: str
    """Short id (unique across groups)."""
    title: str
    """How the prompting baseline names it: "The following text is about <title>."."""
    labels: tuple[str, ...]
    """Dataset labels (before any ``/``) whose texts belong to the topic."""


@dataclass(frozen=True)
class GroupDef:
    name: str
    file: str
    """Under the shared data folder."""
    topics: tuple[TopicDef, ...]


GROUPS: tuple[GroupDef, ...] = (
    GroupDef("mmlu", "reference/mmlu.jsonl.gz", (
        TopicDef("medicine", "medicine and health", (
            "anatomy", "clinical_knowledge", "college_medicine", "medical_genetics", "professional_medicine",
            "virology", "nutrition")),
        TopicDef("law", "law and the courts", ("professional_law", "international_law", "jurisprudence")),
        TopicDef("economics", "economics", (
            "econometrics", "high_school_macroeconomics", "high_school_microeconomics")),
        TopicDef("physics", "physics and astronomy", (
            "astronomy", "conceptual_physics", "college_physics", "high_school_physics")),
    )),
    GroupDef("clinc", "reference/clinc150.jsonl.gz", (
        TopicDef("banking", "banking and money", ("banking",)),
        TopicDef("travel", "travel", ("travel",)),
        TopicDef("cooking", "cooking and food", ("kitchen_and_dining",)),
        TopicDef("cars", "cars and driving", ("auto_and_commute",)),
    )),
    GroupDef("amazon", "topics/amazon_reviews.jsonl.gz", (
        TopicDef("books", "books", ("books",)),
        TopicDef("movies", "movies", ("dvd",)),
        TopicDef("electronics", "electronics", ("electronics",)),
        TopicDef("kitchenware", "kitchen appliances", ("kitchen",)),
    )),
)


@dataclass(frozen=True)
class BenchTopic:
    name: str
    title: str
    group: str
    align: list[str]
    """What the user gives saealign."""
    heldout: list[str]
    """For the group's classifier only."""


def _read(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise SaealignError(f"{path} not found: pass --data pointing at the shared data folder")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            text = " ".join(str(obj.get("text", "")).split())
            if text:
                rows.append((str(obj.get("label", "")).split("/")[0], text))
    return rows


def load_bench_topics(root: Path, n_align: int = 30, n_heldout: int = 150, seed: int = 0,
                      groups: tuple[str, ...] | None = None, max_chars: int = 400) -> list[BenchTopic]:
    """Every topic of ``groups`` (all by default) with disjoint, seeded align/heldout splits.

    Texts are clipped to ``max_chars`` (Amazon reviews run to pages; the classifier and the scoring read
    the start, as the generated 48 tokens are short).
    """
    chosen = [g for g in GROUPS if groups is None or g.name in groups]
    if groups is not None and len(chosen) != len(set(groups)):
        known = ", ".join(g.name for g in GROUPS)
        raise SaealignError(f"unknown benchmark group in {list(groups)}: use some of {known}")
    out: list[BenchTopic] = []
    for group in chosen:
        rows = _read(root / group.file)
        for topic in group.topics:
            texts = sorted({t[:max_chars] for label, t in rows if label in topic.labels})
            random.Random(f"{seed}-{topic.name}").shuffle(texts)
            if len(texts) < n_align + n_heldout:
                raise SaealignError(f"topic {topic.name} has {len(texts)} texts, fewer than {n_align} + {n_heldout}")
            out.append(BenchTopic(topic.name, topic.title, group.name, texts[:n_align],
                                  texts[n_align:n_align + n_heldout]))
    return out
