"""The authors' score CSV: one score per latent, NaN = unscored; export -> import is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from saealign.errors import SaealignError
from saealign.reference.authors_csv import read_authors_csv, write_authors_csv
from saealign.reference.scoring import TopicScores, score_topic


def scored_topic(n: int = 50, seed: int = 0) -> TopicScores:
    """Real scores from score_topic over a random sparse summary: some latents unscored, some exactly 0 or 1."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    summary = sp.random(400, n, density=0.1, random_state=seed, format="csr", dtype=np.float32)
    return score_topic(summary, rng.random(400), min_prompts=38, sae_key="k")


def test_export_import_round_trip_is_exact(tmp_path: Path) -> None:
    topic = scored_topic()
    assert 0 < topic.scored.sum() < topic.d_sae  # both kinds of latent are in the file
    assert (topic.scores[topic.scored] == 0).any() and (topic.scores == 1).any()
    path = write_authors_csv(topic, tmp_path / "scores.csv")
    back = read_authors_csv(path, d_sae=topic.d_sae, sae_key="k")
    assert back.scores.dtype == np.float32 and np.array_equal(back.scores, topic.scores)
    assert np.array_equal(back.scored, topic.scored)
    assert np.array_equal(back.scores[back.top(10)], topic.scores[topic.top(10)])  # g ties aside, same best
    assert (back.sae_key, back.topic_texts) == ("k", []) and "scores.csv" in str(back.note)
    # and exact the other way: the file written again is the same bytes
    assert write_authors_csv(back, tmp_path / "again.csv").read_bytes() == path.read_bytes()


def test_awkward_float32_values_survive(tmp_path: Path) -> None:
    values = np.array([0.1, 1 / 3, 1e-8, np.nextafter(np.float32(1), np.float32(0)), 0.0, 1.0], dtype=np.float32)
    n = len(values)
    topic = TopicScores(values, np.zeros(n), np.full(n, 30), np.ones(n, bool), ["t"])
    back = read_authors_csv(write_authors_csv(topic, tmp_path / "s.csv"))
    assert back.scores.tobytes() == values.tobytes()


def test_file_layout(tmp_path: Path) -> None:
    n = 4
    topic = TopicScores(np.array([0.5, 0, 1, 0.25]), np.zeros(n), np.full(n, 30), np.array([1, 0, 1, 1], bool), [])
    text = write_authors_csv(topic, tmp_path / "s.csv").read_text()
    assert text == "latent,score\n0,0.5\n1,NaN\n2,1.0\n3,0.25\n"


@pytest.mark.parametrize(
    "text",
    [
        "0.5\n\n1.0\n0.25\n",  # one column, pandas' empty cell for NaN
        "score\n0.5\nnan\n1\n0.25\n",  # one named column, numpy's nan
        ",0\n0,0.5\n1,\n2,1.0\n3,0.25\n",  # pandas Series.to_csv(): index column, empty NaN
        "latent,score\n3,0.25\n1,NaN\n0,0.5\n2,1\n",  # any order
        "score,latent\n0.5,0\nNA,1\n1.0,2\n0.25,3\n",  # score first, named
        "\ufefflatent,topic,score\n0,med,0.5\n1,med,\n2,med,1.0\n3,med,0.25\n",  # BOM, extra column by name
    ],
)
def test_the_shapes_score_files_come_in(tmp_path: Path, text: str) -> None:
    (tmp_path / "s.csv").write_text(text, encoding="utf-8")
    got = read_authors_csv(tmp_path / "s.csv", d_sae=4)
    assert np.array_equal(got.scores, np.array([0.5, 0, 1, 0.25], np.float32))
    assert got.scored.tolist() == [True, False, True, True]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "is empty"),
        ("latent,score\n", "a header and no scores"),
        ("0,0.5\n1,high\n", "line 2: score 'high' is not a number"),
        ("0,0.5\n1,1.5\n", r"line 2: score '1.5' is not a number in \[0, 1\]"),
        ("0,0.5\n1,-inf\n", "line 2"),
        ("0,0.5\n1,0.5,9\n", "line 2: 3 columns, the file has 2"),
        ("0,0.5\n0,0.7\n", r"repeats latents \[0\]"),
        ("0,0.5\n2,0.7\n", r"lacks latents \[1\]"),
        ("0,0.5\nx,0.7\n", "latent 'x' is not a whole number"),
        ("a,b,c\n1,2,3\n", "name the score column"),
        ("nan\nnan\n", "scores no latent"),
        ("0.5\n0.7\n0.1\n", "has 3 latents, the SAE has 4"),
    ],
)
def test_malformed_files_are_one_line(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "s.csv").write_text(text)
    with pytest.raises(SaealignError, match=match) as err:
        read_authors_csv(tmp_path / "s.csv", d_sae=4 if "SAE has" in match else None)
    assert "\n" not in str(err.value)


def test_unreadable_paths_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00bad")
    for path, match in ((tmp_path / "none.csv", "no score file"), (tmp_path, "is a folder"),
                        (tmp_path / "bin.csv", "not UTF-8")):
        with pytest.raises(SaealignError, match=match):
            read_authors_csv(path)


def test_export_never_overwrites_a_user_file(tmp_path: Path) -> None:
    mine = tmp_path / "mine.csv"
    mine.write_text("name,value\nx,1\n")
    with pytest.raises(SaealignError, match="not a score CSV saealign wrote"):
        write_authors_csv(scored_topic(), mine)
    assert mine.read_text() == "name,value\nx,1\n"
    with pytest.raises(SaealignError, match="is a folder, not a file"):
        write_authors_csv(scored_topic(), tmp_path)
    ours = write_authors_csv(scored_topic(seed=0), tmp_path / "ours.csv")
    write_authors_csv(scored_topic(seed=1), ours)  # our own export is replaced
    assert np.array_equal(read_authors_csv(ours).scores, scored_topic(seed=1).scores)
