"""The ``Corpus`` value (texts with a topic label and a source each) and what is done to one: cleaning
(:func:`clean`), label-stratified sampling (:func:`sample`) and token truncation (:func:`truncate_tokens`).

Reading one from disk or a hub is elsewhere: :func:`saealign.reference.corpus_spec.read_corpus` parses a
corpus spec and hands each part to :mod:`~saealign.reference.text_files`, :mod:`~saealign.reference.wordnet`
or :mod:`~saealign.reference.hf_datasets`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from saealign.errors import SaealignError


@dataclass(frozen=True)
class Corpus:
    """Texts with one topic label and one source name each (parallel lists of equal length)."""

    texts: list[str]
    """The texts, in reading order."""
    labels: list[str]
    """Topic of each text (file stem, a label field, a WordNet lexicographer file ...)."""
    sources: list[str]
    """Where each text came from (a ``source`` field, else the file stem, ``wordnet``, ``hf:name``)."""
    name: str = ""
    """Short name for reports (the spec it was read from)."""

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.labels) == len(self.sources):
            raise SaealignError(
                f"corpus {self.name!r} has {len(self.texts)} texts, {len(self.labels)} labels and "
                f"{len(self.sources)} sources: give one label and one source a text"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """Short SHA-256 of texts and labels (cache key; sources and name do not change results)."""
        payload = json.dumps([self.texts, self.labels], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def subset(self, indices: Iterable[int]) -> Corpus:
        """The texts at ``indices`` (in that order), keeping the name."""
        idx = [int(i) for i in indices]
        return Corpus(
            [self.texts[i] for i in idx], [self.labels[i] for i in idx], [self.sources[i] for i in idx], self.name
        )

    @staticmethod
    def concat(parts: Sequence[Corpus], name: str | None = None) -> Corpus:
        """All texts of ``parts`` one after the other."""
        return Corpus(
            [t for p in parts for t in p.texts],
            [lab for p in parts for lab in p.labels],
            [s for p in parts for s in p.sources],
            name if name is not None else ",".join(p.name for p in parts),
        )


@dataclass(frozen=True)
class CorpusOptions:
    """How raw texts are cleaned after reading."""

    strip: bool = True
    """Remove leading and trailing whitespace."""
    drop_empty: bool = True
    """Leave out texts that are empty (after stripping)."""
    dedupe: bool = True
    """Keep only the first of identical texts (exact match, after stripping and truncation)."""
    max_chars: int | None = None
    """Cut texts to this many characters (token limits are applied by the index: ``truncate_tokens``)."""

    def __post_init__(self) -> None:
        if self.max_chars is not None and self.max_chars < 1:
            raise SaealignError(f"max_chars is {self.max_chars}: give a positive number or None")


def clean(corpus: Corpus, options: CorpusOptions = CorpusOptions()) -> Corpus:
    """Apply ``options`` (strip, truncate, drop empty, de-duplicate) and return the kept texts."""
    texts: list[str] = []
    kept: list[int] = []
    seen: set[str] = set()
    for i, text in enumerate(corpus.texts):
        if options.strip:
            text = text.strip()
        if options.max_chars is not None and len(text) > options.max_chars:
            text = text[: options.max_chars]
            if options.strip:
                text = text.rstrip()
        if (options.drop_empty and not text.strip()) or (options.dedupe and text in seen):
            continue
        if options.dedupe:
            seen.add(text)
        texts.append(text)
        kept.append(i)
    return Corpus(texts, [corpus.labels[i] for i in kept], [corpus.sources[i] for i in kept], corpus.name)


def sample(corpus: Corpus, n: int, seed: int = 0, stratify: bool = True) -> Corpus:
    """``n`` texts drawn without replacement (in corpus order); the whole corpus when ``n >= len``.

    With ``stratify`` each label gets a share proportional to its size (largest remainders fill
    up to exactly ``n``), and every label gets at least one text when ``n`` is at least the number
    of labels. The same ``seed`` always gives the same sample.
    """
    if n < 0:
        raise SaealignError(f"sample size {n} is negative: give a size of 0 or more")
    if n >= len(corpus) or n == 0:
        return corpus.subset(range(len(corpus) if n else 0))
    rng = np.random.default_rng(seed)
    if not stratify:
        return corpus.subset(np.sort(rng.choice(len(corpus), size=n, replace=False)))
    names, inverse = np.unique(np.asarray(corpus.labels, dtype=object), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))
    quota = n * counts / counts.sum()
    alloc = np.floor(quota).astype(np.int64)
    if n >= len(names):
        alloc = np.maximum(alloc, 1)
    tiebreak = rng.random(len(names)) * 1e-9  # equal remainders: seeded, not alphabetical, choice
    while alloc.sum() > n:  # the at-least-one rule overshot: take back from the most over-served labels
        over = np.where(alloc > 1, alloc - quota + tiebreak, -np.inf)
        take = np.argsort(-over, kind="stable")[: min(int(alloc.sum() - n), int((alloc > 1).sum()))]
        alloc[take] -= 1
    short = int(n - alloc.sum())
    if short > 0:  # floors undershot by less than one a label: the largest remainders get one more
        remainder = np.where(alloc < counts, quota - alloc + tiebreak, -np.inf)
        alloc[np.argsort(-remainder, kind="stable")[:short]] += 1
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])  # indices of each label
    chosen = [rng.choice(m, size=int(k), replace=False) for m, k in zip(members, alloc, strict=True)]
    return corpus.subset(np.sort(np.concatenate(chosen)))


def truncate_tokens(texts: Sequence[str], tokenizer: Any, max_tokens: int) -> list[str]:
    """Cut each text after its first ``max_tokens`` tokens (no special tokens counted).

    Uses the fast tokenizer's character offsets so the kept text is an exact prefix of the
    original (decoding tokens back would change spacing and case for some tokenizers).
    """
    if max_tokens < 1:
        raise SaealignError(f"max_tokens is {max_tokens}: give a positive number")
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for text, offsets in zip(texts, enc["offset_mapping"], strict=True):
        out.append(text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]])
    return out
