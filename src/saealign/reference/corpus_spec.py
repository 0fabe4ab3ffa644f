"""Reading a corpus spec: reference corpora (``P_ref``) from files, folders, WordNet or a hub dataset.

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

from pathlib import Path

from saealign.errors import SaealignError
from saealign.reference.corpus import Corpus, CorpusOptions, clean
from saealign.reference.hf_datasets import read_hf_dataset
from saealign.reference.text_files import FILE_SUFFIXES, file_kind, read_file
from saealign.reference.wordnet import read_wordnet

DEFAULT_OPTIONS = CorpusOptions()
"""The cleaning :func:`read_corpus` applies unless told otherwise (frozen, so one shared value serves)."""


def read_corpus(
    spec: str, text_field: str = "text", label_field: str = "label", source_field: str = "source",
    include_examples: bool = True, options: CorpusOptions = DEFAULT_OPTIONS,
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
        return read_hf_dataset(spec, *fields[:3])
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p) and not p.name.startswith("."))
        if not files:
            raise SaealignError(f"folder {spec} holds no {'/'.join(FILE_SUFFIXES)} files: add some or name a file")
        return Corpus.concat([read_file(p, *fields) for p in files], name=spec)
    if not path.exists():
        raise SaealignError(f"corpus {spec} not found: give a file, a folder, 'wordnet' or 'hf:name[:split]'")
    return read_file(path, *fields)
