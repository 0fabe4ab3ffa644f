"""The paper's authors' score files: CSV, one score per latent, NaN = unscored. Import and export.

Their code scores in the relevancy direction (1 = most aligned, as :class:`TopicScores`; METHOD.md) and
has no min-prompts threshold: a latent that never fired gets 0/0 = NaN. So a row's number is the
latent's score and NaN (or an empty cell) marks it unscored.

Files read: a single column (row i = latent i), or two columns ``latent,score`` in any order, with or
without a header (pandas' ``Series.to_csv()`` writes ``,0`` or ``,score`` and empty cells for NaN;
numpy writes ``nan``). Files written: ``latent,score`` with ``NaN`` for unscored latents and each
score as the shortest decimal that reads back to the same float32, so export -> import is exact.

A CSV holds scores only: g, prompt counts and topic texts are not in it, so an imported
:class:`TopicScores` has g = NaN and zero prompt counts, and its note says where it came from.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from saealign.cache import atomic_write_bytes
from saealign.errors import SaealignError
from saealign.reference.scoring import TopicScores

HEADER = ("latent", "score")
_NAN_WORDS = {"", "nan", "na", "n/a", "null", "none"}
_SCORE_NAMES = ("score", "scores")
_LATENT_NAMES = ("latent", "latents", "feature", "index", "")


def write_authors_csv(scores: TopicScores, path: str | Path) -> Path:
    """Write ``scores`` as ``latent,score`` rows (NaN where unscored); returns the path.

    Replaces only a file that is itself a score CSV (its first line is ``latent,score``): any other
    file at ``path`` is the user's and is refused with one line.
    """
    path = check_csv_target(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for i, (value, scored) in enumerate(zip(scores.scores, scores.scored, strict=True)):
        writer.writerow((i, str(np.float32(value)) if scored else "NaN"))
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def check_csv_target(path: str | Path) -> Path:
    """Raise one line unless :func:`write_authors_csv` may write ``path`` (call it before long work)."""
    path = Path(path)
    if path.is_dir():
        raise SaealignError(f"{path} is a folder, not a file: give a file path for the score CSV")
    if path.exists() and not _is_our_export(path):
        raise SaealignError(f"{path} exists and is not a score CSV saealign wrote: give a new file name or move it away")
    return path


def read_authors_csv(path: str | Path, d_sae: int | None = None, sae_key: str = "") -> TopicScores:
    """A :class:`TopicScores` from a score CSV; ``d_sae``, when given, must match its number of latents.

    One :class:`SaealignError` line for a missing, undecodable or malformed file (naming the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except FileNotFoundError:
        raise SaealignError(f"no score file at {path}") from None
    except IsADirectoryError:
        raise SaealignError(f"{path} is a folder: give the score CSV file") from None
    except UnicodeDecodeError as e:
        raise SaealignError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): give a CSV file") from None
    except OSError as e:
        raise SaealignError(f"cannot read {path}: {e.strerror or e}") from None
    rows = _rows(text)
    if not rows:
        raise SaealignError(f"{path} is empty: expected one score per latent")
    latents, values = _parse(rows, path)
    n = len(values)
    if d_sae is not None and n != d_sae:
        raise SaealignError(f"{path} has {n} latents, the SAE has {d_sae}: use the scores made for this SAE")
    order = np.argsort(latents, kind="stable")
    if not np.array_equal(latents[order], np.arange(n)):
        ids, counts = np.unique(latents, return_counts=True)
        dup = ids[counts > 1][:5].tolist()
        missing = np.setdiff1d(np.arange(n), ids)[:5].tolist()
        what = f"repeats latents {dup}" if dup else f"lacks latents {missing}"
        raise SaealignError(f"{path} {what}: expected each latent 0..{n - 1} once")
    scores = values[order]
    scored = ~np.isnan(scores)
    if not scored.any():
        raise SaealignError(f"{path} scores no latent (every row is NaN): nothing to steer with")
    return TopicScores(
        scores=np.where(scored, scores, 0.0).astype(np.float32),
        g=np.full(n, np.nan),
        n_prompts=np.zeros(n, dtype=np.int64),
        scored=scored,
        topic_texts=[],
        min_prompts=0,
        sae_key=sae_key,
        note=f"imported from the score CSV {path.name}: NaN rows unscored; no g, prompt counts or topic texts",
        extra={"source": "authors_csv", "file": str(path)},
    )


def _rows(text: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of the records. In a one-column file a blank line is a latent with no
    score (pandas writes NaN as an empty cell), so only trailing blank lines are dropped there."""
    rows = list(enumerate(csv.reader(io.StringIO(text)), start=1))
    while rows and not any(c.strip() for c in rows[-1][1]):
        rows.pop()
    first = next((row for _, row in rows if any(c.strip() for c in row)), [])
    if len(first) == 1:
        return [(n, row or [""]) for n, row in rows]
    return [(n, row) for n, row in rows if any(c.strip() for c in row)]


def _parse(rows: list[tuple[int, list[str]]], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(latent ids, scores with NaN) from the non-blank rows, after finding the columns and any header."""
    width = len(rows[0][1])
    header = [c.strip().lower() for c in rows[0][1]]
    score_col, latent_col = (0, None) if width == 1 else (1, 0)
    has_header = not _is_data_row(rows[0][1], score_col, latent_col)
    if width > 2:
        # more columns than latent + score: only named ones can be told apart
        score_col = next((header.index(c) for c in _SCORE_NAMES if c in header), -1)
        latent_col = next((header.index(c) for c in _LATENT_NAMES if c in header), None)
        if not has_header or score_col < 0 or latent_col is None or latent_col == score_col:
            raise SaealignError(
                f"{path} has {width} columns: name the score column 'score' and the latent column 'latent' in a header"
            )
        has_header = True
    elif width == 2 and has_header and "score" in header and header.index("score") == 0:
        score_col, latent_col = 0, 1  # a header may put the score first
    data = rows[1:] if has_header else rows
    latents = np.empty(len(data), dtype=np.int64)
    values = np.empty(len(data), dtype=np.float64)
    for j, (line, row) in enumerate(data):
        if len(row) != width:
            raise SaealignError(f"{path} line {line}: {len(row)} columns, the file has {width}")
        score = _score(row[score_col])
        if score is None or math.isinf(score) or not (math.isnan(score) or 0.0 <= score <= 1.0):
            raise SaealignError(
                f"{path} line {line}: score {row[score_col]!r} is not a number in [0, 1] or NaN "
                "(scores run from 0 to 1, 1 = most aligned)"
            )
        values[j] = score
        if latent_col is None:
            latents[j] = j
        else:
            cell = row[latent_col].strip()
            if not cell.isdigit():
                raise SaealignError(f"{path} line {line}: latent {row[latent_col]!r} is not a whole number >= 0")
            latents[j] = int(cell)
    if not len(data):
        raise SaealignError(f"{path} has a header and no scores")
    return latents, values


def _score(cell: str) -> float | None:
    text = cell.strip()
    if text.lower() in _NAN_WORDS:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def _is_data_row(row: list[str], score_col: int, latent_col: int | None) -> bool:
    score_ok = _score(row[score_col]) is not None
    return score_ok and (latent_col is None or row[latent_col].strip().isdigit())


def _is_our_export(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() == ",".join(HEADER)
    except (OSError, UnicodeDecodeError):
        return False
