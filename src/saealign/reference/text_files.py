"""Reading text files into a corpus: ``.txt`` (one text a line), ``.jsonl``, ``.csv``, ``.parquet`` (the text
formats also gzipped), strictly as UTF-8 with one clear error line per bad line; and topic files (:func:`read_topic`).

:func:`rows_to_corpus` turns the rows of any table (a file here, a Hugging Face dataset in
:mod:`~saealign.reference.hf_datasets`) into a :class:`~saealign.reference.corpus.Corpus`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from saealign.errors import SaealignError
from saealign.reference.corpus import Corpus

FILE_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
"""File types a corpus or folder may hold (each text format also as ``.gz``)."""


def file_kind(path: Path) -> str:
    """The format of ``path`` ('' when not a corpus file): '.txt', '.jsonl', '.csv' or '.parquet'."""
    name = path.name.lower().removesuffix(".gz")
    return next((s for s in FILE_SUFFIXES if name.endswith(s)), "")


def file_stem(path: Path) -> str:
    """File name without its format suffixes: ``wordnet.jsonl.gz`` -> ``wordnet``."""
    name = path.name.removesuffix(".gz").removesuffix(".GZ")
    return name[: -len(file_kind(path))] if file_kind(path) else path.stem


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
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


def read_file(path: Path, text_field: str, label_field: str, source_field: str, examples: bool) -> Corpus:
    """One corpus file (format from its suffix); a row's missing label or source falls back to the file stem."""
    kind, stem = file_kind(path), file_stem(path)
    if kind == ".txt":
        texts = [line for _, line in text_lines(path)]
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
    return rows_to_corpus(rows, str(path), stem, text_field, label_field, source_field, examples)


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of each JSON object of a ``.jsonl(.gz)`` file (blank lines skipped); ``where`` names the
    line for error messages. Strict UTF-8 and one clear line for anything that is not a JSON object."""
    return (_json_row(path, n, line) for n, line in text_lines(path) if line.strip())


def _json_row(path: Path, number: int, line: str) -> tuple[str, dict[str, Any]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SaealignError(f"{path} line {number} is not valid JSON ({e.msg}): write one JSON object a line") from None
    if not isinstance(row, dict):
        raise SaealignError(f"{path} line {number} is not a JSON object: write one object a line")
    return f"{path} line {number}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = "\n".join(line for _, line in text_lines(path))
    for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        yield f"{path} row {number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SaealignError(f"reading {path} needs pyarrow: pip install 'saealign[data]'") from None
    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path} row {number}", row


def rows_to_corpus(
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
        if file_kind(path) in ("", ".txt"):
            found = [line.strip() for _, line in text_lines(path)]
        else:
            found = [t.strip() for t in read_file(path, "text", "label", "source", False).texts]
        found = [t for t in found if t]
        if not found:
            raise SaealignError(f"topic file {spec} has no texts: put one example text a line")
        out.update(dict.fromkeys(found))
    out.update(dict.fromkeys(t.strip() for t in texts if t.strip()))
    if not out:
        raise SaealignError("no topic texts given: pass a topic file or some example texts")
    return list(out)
