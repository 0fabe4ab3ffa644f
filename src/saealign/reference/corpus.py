"""Text collections: reference corpora (``P_ref``) and topic texts (``P_align``).

A corpus spec names where texts come from; several specs joined with ``,`` are concatenated:

- a file: ``.txt`` (one text a line), ``.jsonl`` / ``.jsonl.gz``, ``.csv``, ``.parquet`` (any of
  the text formats may also be gzipped), or a folder of them (recursive, sorted); a text's label
  defaults to its file's stem;
- ``wordnet`` or ``wordnet:/path/to/dict``: the WordNet 3.0 database files ``data.{noun,verb,adj,adv}``
  (Debian's ``wordnet-base`` puts them in ``/usr/share/wordnet``): one ``lemma: definition`` text a
  synset, labelled with its lexicographer file (``noun.body``, ``verb.motion`` ...), plus one text a
  usage example;
- ``hf:name[:split]``: a Hugging Face dataset (needs the ``datasets`` package and a reachable hub).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saealign.errors import SaealignError

FILE_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
"""File types a corpus or folder may hold (each text format also as ``.gz``)."""

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/local/WordNet-3.0/dict")
"""Where ``wordnet`` looks for the database when no folder is given (after ``$WNHOME/dict``)."""

# The WordNet 3.0 ``lexnames`` file: lexicographer file number -> name (45 files).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip

_WORDNET_POS = ("noun", "verb", "adj", "adv")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives: long(a), used_to(p)
_QUOTED = re.compile(r'"([^"]*)"')


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


def read_corpus(
    spec: str, text_field: str = "text", label_field: str = "label", source_field: str = "source",
    include_examples: bool = True, options: CorpusOptions = CorpusOptions(),
) -> Corpus:  # fmt: skip
    """Read the corpus named by ``spec`` (see the module docstring) and clean it with ``options``.

    ``text_field``/``label_field``/``source_field`` name the columns of jsonl, csv, parquet and HF
    datasets; a missing label or source falls back to the file stem. ``include_examples`` adds each
    WordNet usage example (and each item of a jsonl ``examples`` list) as its own text with the
    same label.
    """
    fields = (text_field, label_field, source_field, include_examples)
    parts = [_read_one(s.strip(), fields) for s in spec.split(",") if s.strip()]
    if not parts:
        raise SaealignError(f"corpus spec {spec!r} names nothing: give a file, folder, 'wordnet' or 'hf:name'")
    corpus = clean(Corpus.concat(parts, name=spec), options)
    if not len(corpus):
        raise SaealignError(f"corpus {spec!r} has no texts after cleaning: check the files and --text-field")
    return corpus


def _read_one(spec: str, fields: tuple[str, str, str, bool]) -> Corpus:
    if spec == "wordnet" or spec.startswith("wordnet:"):
        folder = spec.partition(":")[2]
        return read_wordnet(Path(folder) if folder else None, include_examples=fields[3])
    if spec.startswith("hf:"):
        return _read_hf(spec, *fields[:3])
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) and not p.name.startswith("."))
        if not files:
            raise SaealignError(f"folder {spec} holds no {'/'.join(FILE_SUFFIXES)} files: add some or name a file")
        return Corpus.concat([_read_file(p, *fields) for p in files], name=spec)
    if not path.exists():
        raise SaealignError(f"corpus {spec} not found: give a file, a folder, 'wordnet' or 'hf:name[:split]'")
    return _read_file(path, *fields)


def _kind(path: Path) -> str:
    """The format of ``path`` ('' when not a corpus file): '.txt', '.jsonl', '.csv' or '.parquet'."""
    name = path.name.lower().removesuffix(".gz")
    return next((s for s in FILE_SUFFIXES if name.endswith(s)), "")


def _stem(path: Path) -> str:
    """File name without its format suffixes: ``wordnet.jsonl.gz`` -> ``wordnet``."""
    name = path.name.removesuffix(".gz").removesuffix(".GZ")
    return name[: -len(_kind(path))] if _kind(path) else path.stem


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line without its terminator)`` of a text file (gzipped or not), strict UTF-8."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise SaealignError(f"{path} line {number} is not UTF-8: save the file as UTF-8") from None
                if number == 1:
                    line = line.removeprefix("\ufeff")  # byte-order mark written by some editors
                yield number, line.rstrip("\r\n")
    except (OSError, EOFError) as e:
        raise SaealignError(f"cannot read {path}: {e}") from None


def _read_file(path: Path, text_field: str, label_field: str, source_field: str, examples: bool) -> Corpus:
    kind, stem = _kind(path), _stem(path)
    if kind == ".txt":
        texts = [line for _, line in _lines(path)]
        return Corpus(texts, [stem] * len(texts), [stem] * len(texts), str(path))
    rows: Iterable[tuple[str, dict[str, Any]]]
    if kind == ".jsonl":
        rows = jsonl_rows(path)
    elif kind == ".csv":
        rows = _csv_rows(path)
    elif kind == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise SaealignError(f"{path} is not a corpus file: use {', '.join(FILE_SUFFIXES)} (or .gz of the text ones)")
    return _from_rows(rows, str(path), stem, text_field, label_field, source_field, examples)


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of each JSON object of a ``.jsonl(.gz)`` file (blank lines skipped); ``where`` names the
    line for error messages. Strict UTF-8 and one clear line for anything that is not a JSON object."""
    return (_json_row(path, n, line) for n, line in _lines(path) if line.strip())


def _json_row(path: Path, number: int, line: str) -> tuple[str, dict[str, Any]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SaealignError(f"{path} line {number} is not valid JSON ({e.msg}): write one JSON object a line") from None
    if not isinstance(row, dict):
        raise SaealignError(f"{path} line {number} is not a JSON object: write one object a line")
    return f"{path} line {number}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = "\n".join(line for _, line in _lines(path))
    for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        yield f"{path} row {number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SaealignError(f"reading {path} needs pyarrow: pip install 'saealign[data]'") from None
    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path} row {number}", row


def _from_rows(
    rows: Iterable[tuple[str, dict[str, Any]]], name: str, stem: str, text_field: str, label_field: str,
    source_field: str, examples: bool,
) -> Corpus:  # fmt: skip
    """``(where, row)`` pairs of a table -> corpus; ``where`` names the row in error messages."""
    texts, labels, sources = [], [], []
    for where, row in rows:
        text = row.get(text_field)
        if not isinstance(text, str):
            found = ", ".join(sorted(map(str, row))) or "none"
            problem = "has no" if text is None else "has a non-text"
            raise SaealignError(f"{where} {problem} {text_field!r} field (fields: {found}): pass the right text field")
        label = row.get(label_field)
        label = stem if label is None or label == "" else str(label)
        source = row.get(source_field)
        source = stem if source is None or source == "" else str(source)
        extra = row.get("examples") if examples else None
        group = [text] + [e for e in extra if isinstance(e, str)] if isinstance(extra, list) else [text]
        texts += group
        labels += [label] * len(group)
        sources += [source] * len(group)
    return Corpus(texts, labels, sources, name)


def find_wordnet(folder: Path | None = None) -> Path:
    """The folder holding WordNet's ``data.*`` files: ``folder``, else ``$WNHOME/dict``, else the usual places."""
    if folder is not None:
        candidates = [folder]
    else:
        wnhome = os.environ.get("WNHOME")
        candidates = ([Path(wnhome) / "dict"] if wnhome else []) + [Path(p) for p in WORDNET_DIRS]
    for c in candidates:
        if (c / "data.noun").is_file():
            return c
    where = folder if folder is not None else WORDNET_DIRS[0]
    raise SaealignError(
        f"WordNet database (data.noun ...) not found in {where}: install it (apt-get install wordnet-base), "
        "pass wordnet:/path/to/dict, or read a wordnet.jsonl.gz file"
    )


def parse_wordnet_line(line: str) -> tuple[str, str, str, list[str]] | None:
    """One line of a WordNet ``data.*`` file -> ``(lemma, lexname, definition, examples)``.

    The format (wndb(5)): ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt pointers ...
    [frames] | gloss``; ``w_cnt`` is hexadecimal and the gloss reads ``definition; "example"; ...``.
    Returns None for the licence header (lines starting with two spaces).
    """
    if line.startswith("  ") or not line.strip():
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    try:
        lexname = LEXNAMES[int(fields[1])]
        n_words = int(fields[3], 16)
        lemma = _ADJ_MARKER.sub("", fields[4]).replace("_", " ")
    except (IndexError, ValueError):
        raise SaealignError(f"not a WordNet data line: {line[:60]!r}: point wordnet: at a WordNet 3.0 dict") from None
    if n_words < 1:
        raise SaealignError(f"WordNet synset {fields[0]} has no words: the data file is damaged")
    gloss = gloss.strip()
    # The definition ends where the first quoted example starts (after '; ', or ': ' in a few
    # glosses); a quote inside the definition ('as in "carrot and stick"') is not an example.
    first = re.search(r'(?:^|[;:]\s*)"', gloss)
    definition = (gloss[: first.start()] if first else gloss).strip().rstrip(";").strip()
    examples = [e.strip() for e in _QUOTED.findall(gloss[first.start() :])] if first else []
    return lemma, lexname, definition, [e for e in examples if e]


def read_wordnet(folder: Path | None = None, include_examples: bool = True) -> Corpus:
    """WordNet 3.0 as a corpus: ``lemma: definition`` a synset (+ each usage example), labelled by lexname.

    Reads ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv`` in that order (117,659 synsets).
    """
    root = find_wordnet(folder)
    texts, labels = [], []
    for pos in _WORDNET_POS:
        path = root / f"data.{pos}"
        if not path.is_file():
            raise SaealignError(f"{path} is missing: the WordNet dict folder needs data.noun/verb/adj/adv")
        for _, line in _lines(path):
            parsed = parse_wordnet_line(line)
            if parsed is None:
                continue
            lemma, lexname, definition, examples = parsed
            group = [f"{lemma}: {definition}"] + (examples if include_examples else [])
            texts += group
            labels += [lexname] * len(group)
    return Corpus(texts, labels, ["wordnet"] * len(texts), f"wordnet:{root}")


def _read_hf(spec: str, text_field: str, label_field: str, source_field: str) -> Corpus:
    name, _, split = spec[3:].partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise SaealignError(f"{spec} needs the datasets package: pip install datasets (and a reachable hub)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types (offline, missing repo, bad split)
        raise SaealignError(
            f"cannot load HF dataset {name!r} split {split!r} ({type(e).__name__}): the hub may be unreachable; "
            "save the data as jsonl/parquet and pass the file"
        ) from None
    # Class labels are stored as integers with their names in the features; report the names.
    names = getattr((getattr(ds, "features", None) or {}).get(label_field), "names", None)
    stem = f"hf:{name}"
    rows = (
        (f"{spec} row {i}", {**r, label_field: names[r[label_field]]} if names and label_field in r else r)
        for i, r in enumerate(ds)
    )
    return _from_rows(rows, spec, stem, text_field, label_field, source_field, examples=False)


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


def read_topic(specs: str | Path | Sequence[str | Path] = (), texts: Sequence[str] = ()) -> list[str]:
    """Topic texts: the union (first occurrence kept, in order) of topic files and ``texts``.

    A ``.txt`` file holds one text a line; ``.jsonl(.gz)``, ``.csv`` and ``.parquet`` files are read
    through their ``text`` field. Blank lines are skipped and texts are stripped.
    """
    paths = [specs] if isinstance(specs, str | Path) else list(specs)
    out: dict[str, None] = {}
    for spec in paths:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SaealignError(f"topic file {spec} not found: give a .txt file with one example text a line")
        if _kind(path) in ("", ".txt"):
            found = [line.strip() for _, line in _lines(path)]
        else:
            found = [t.strip() for t in _read_file(path, "text", "label", "source", False).texts]
        found = [t for t in found if t]
        if not found:
            raise SaealignError(f"topic file {spec} has no texts: put one example text a line")
        out.update(dict.fromkeys(found))
    out.update(dict.fromkeys(t.strip() for t in texts if t.strip()))
    if not out:
        raise SaealignError("no topic texts given: pass a topic file or some example texts")
    return list(out)
