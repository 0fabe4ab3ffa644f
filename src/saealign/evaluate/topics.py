"""The paper's evaluation topics on our data: texts, test prompts and the prompting baseline's instruction.

- ``medical``: MedQuAD answers (the paper's wiki_medical_terms is hub-only); prompts: the paper's
  12 medical metaphors;
- ``amazon``: Amazon product reviews (Blitzer et al.), the paper's second topic;
- ``sycophancy``: CAA sycophancy items, each A/B question with its sycophantic answer (open-ended
  items as they are);
- ``shoes``: the 20 shoe texts and 20 prompts we wrote (shipped in the package).

Amazon and sycophancy are continued from the same 12 metaphor prompts as medical: generic
sentence openings that belong to none of the three topics. Unaligned text (for the token-level
experiments) is ``topics/unaligned_awesome_prompts.jsonl.gz``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from saealign.defaults import PACKAGE_DATA
from saealign.errors import SaealignError
from saealign.reference.text_files import jsonl_rows


@dataclass(frozen=True)
class EvalTopic:
    name: str
    source: str
    """``topics/<file>`` under the shared data folder, or ``package:<file>`` for our own files."""
    prompts: str
    instruction: str
    """The prompting baseline's prefix: the strongest simple peer of steering methods."""


TOPICS: dict[str, EvalTopic] = {
    "medical": EvalTopic("medical", "topics/medical_medquad.jsonl.gz", "topics/medical_metaphors.txt",
                         "Write about medicine and health. "),
    "amazon": EvalTopic("amazon", "topics/amazon_reviews.jsonl.gz", "topics/medical_metaphors.txt",
                        "Write a customer review of a product. "),
    "sycophancy": EvalTopic("sycophancy", "topics/sycophancy_caa.jsonl.gz", "topics/medical_metaphors.txt",
                            "Agree with whatever the person believes and flatter them. "),
    "shoes": EvalTopic("shoes", "package:topics/shoes.txt", "package:shoes_prompts.txt", "Write about shoes. "),
}


def _path(root: Path, spec: str) -> Path:
    path = PACKAGE_DATA / spec.removeprefix("package:") if spec.startswith("package:") else root / spec
    if not path.exists():
        raise SaealignError(f"{path} not found: pass --data pointing at the shared data folder")
    return path


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_jsonl_texts(path: Path) -> list[str]:
    """Texts of a shared-data JSONL file; sycophancy A/B items get their sycophantic answer appended."""
    out = []
    for where, row in jsonl_rows(path):
        text = row.get("text")
        if not isinstance(text, str):
            raise SaealignError(f"{where}: need a JSON object with a string `text`")
        if row.get("answer_matching_behavior"):
            text = f"{text}\nAnswer: {row['answer_matching_behavior']}"
        if text.strip():
            out.append(text)
    return out


def topic_texts(root: Path, name: str) -> list[str]:
    """All texts of topic ``name`` (de-duplicated, in file order)."""
    if name not in TOPICS:
        raise SaealignError(f"unknown evaluation topic {name!r}: use one of {', '.join(TOPICS)}")
    path = _path(root, TOPICS[name].source)
    texts = read_jsonl_texts(path) if path.name.endswith(".jsonl.gz") else _lines(path)
    return list(dict.fromkeys(texts))


def topic_prompts(root: Path, name: str) -> list[str]:
    """The test prompts of topic ``name`` (one a line)."""
    if name not in TOPICS:
        raise SaealignError(f"unknown evaluation topic {name!r}: use one of {', '.join(TOPICS)}")
    path = _path(root, TOPICS[name].prompts)
    prompts = _lines(path)
    if not prompts:
        raise SaealignError(f"{path} holds no prompts: restore it from the shared data (one prompt a line)")
    return prompts


def unaligned_texts(root: Path, n: int, seed: int = 0) -> list[str]:
    texts = list(dict.fromkeys(read_jsonl_texts(_path(root, "topics/unaligned_awesome_prompts.jsonl.gz"))))
    return random.Random(seed).sample(texts, min(n, len(texts)))


def split(texts: list[str], n_topic: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint random samples: ``n_topic`` texts to score the topic, ``n_heldout`` to measure against.

    Small topics (our 20 shoe texts) are split in two halves when they cannot fill both parts. The
    topic part is drawn first, so it does not depend on ``n_heldout``: every experiment (and
    ``eval topic-signal``) scores the same topic texts and ``eval all`` fine-tunes on them once.
    """
    texts = list(dict.fromkeys(texts))
    if len(texts) < n_topic + n_heldout:
        if len(texts) < 8:
            raise SaealignError(f"the topic has {len(texts)} texts; at least 8 are needed for disjoint "
                                f"topic/held-out splits ({n_topic} + {n_heldout} asked)")
        n_topic = len(texts) // 2
        n_heldout = len(texts) - n_topic
    rng = random.Random(seed)
    topic = rng.sample(texts, n_topic)
    chosen = set(topic)
    return topic, rng.sample([t for t in texts if t not in chosen], n_heldout)


def shared_split(root: Path, name: str, n_topic: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """Topic ``name``'s split with 200 held out (as the generated-text experiments), the held-out part cut to
    ``n_heldout``: every experiment scores (and ``eval all`` fine-tunes on) the same topic texts."""
    topic, heldout = split(topic_texts(root, name), n_topic, max(n_heldout, 200))
    return topic, heldout[:n_heldout]
