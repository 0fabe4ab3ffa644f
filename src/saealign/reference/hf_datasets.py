"""Hugging Face datasets as a corpus (``hf:name[:split]``); needs the ``datasets`` package and a reachable hub,
and says so in one line when either is missing.
"""

from __future__ import annotations

from saealign.errors import SaealignError
from saealign.reference.corpus import Corpus
from saealign.reference.text_files import rows_to_corpus


def read_hf_dataset(spec: str, text_field: str, label_field: str, source_field: str) -> Corpus:
    """The dataset named by ``spec`` (``hf:name[:split]``, split ``train`` by default) as a corpus; class labels
    stored as integers are reported by their names."""
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
    return rows_to_corpus(rows, spec, stem, text_field, label_field, source_field, examples=False)
