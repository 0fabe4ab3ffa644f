"""An index's texts and labels: gzipped JSONL on disk, one UTF-8 blob with offsets in memory.

Scoring never needs the texts; explaining a latent needs a few. Held as Python strings, 20,000
WordNet texts and labels took ~500 bytes a prompt (half the index again); as one blob plus offsets
and label codes they take ~110, and :meth:`TextStore.text` decodes only the rows asked for.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np


def texts_bytes(texts: list[str], labels: list[str]) -> bytes:
    """The gzipped JSONL of texts and labels, byte-identical for identical inputs (no time stamp)."""
    lines = "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n"
                    for t, lab in zip(texts, labels, strict=True))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as f:
        f.write(lines.encode())
    return out.getvalue()


class TextStore:
    """Texts (one UTF-8 blob + int64 offsets) and labels (int32 codes into the distinct names)."""

    def __init__(self, texts: list[str], labels: list[str]) -> None:
        encoded = [t.encode() for t in texts]
        self.blob = b"".join(encoded)
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        codes: dict[str, int] = {}
        self.label_codes = np.array([codes.setdefault(lab, len(codes)) for lab in labels], dtype=np.int32)
        self.label_names = list(codes)

    @classmethod
    def read(cls, path: Path) -> TextStore:
        texts, labels = [], []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    texts.append(row["text"])
                    labels.append(row["label"])
        return cls(texts, labels)

    def __len__(self) -> int:
        return len(self.label_codes)

    def text(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].decode()

    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self))]

    def labels(self) -> list[str]:
        return [self.label_names[c] for c in self.label_codes]
