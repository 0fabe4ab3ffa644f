"""Atomic folder writes never delete what saealign did not write, and refuse with one line instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_sae
from saealign import cache
from saealign.cache import OWNED_FILE, atomic_dir, atomic_write_bytes, check_replaceable, foreign_files
from saealign.errors import SaealignError
from saealign.reference.scoring import TopicScores
from saealign.sae.autoencoder import CFG_FILE, WEIGHTS_FILE


def user_folder(path: Path) -> Path:
    """A folder of the user's own files, as in the report: notes.txt and sub/data.csv."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write(final: Path, **files: str) -> None:
    with atomic_dir(final) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_new_folder_records_what_saealign_wrote(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "deep").mkdir()
        (tmp / "deep" / "b.txt").write_text("b")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left beside it
    assert json.loads((final / OWNED_FILE).read_text())["files"] == ["a.txt", "deep/b.txt"]
    assert foreign_files(final) == []


def test_foreign_folder_is_refused_before_the_work_and_kept_intact(tmp_path: Path) -> None:
    final = user_folder(tmp_path / "mine")
    before = snapshot(final)
    ran = []
    with pytest.raises(SaealignError) as err, atomic_dir(final):
        ran.append(True)
    message = str(err.value)
    assert "\n" not in message and "notes.txt" in message and "sub/data.csv" in message
    assert "did not write" in message
    assert not ran  # refused before the caller's (possibly long) work
    assert snapshot(final) == before and sorted(os.listdir(tmp_path)) == ["mine"]


def test_saealign_folder_is_replaced_whole(tmp_path: Path) -> None:
    final = tmp_path / "out"
    write(final, **{"old.txt": "old", "both.txt": "v1"})
    write(final, **{"new.txt": "new", "both.txt": "v2"})
    assert snapshot(final) == {
        OWNED_FILE: (final / OWNED_FILE).read_bytes(), "both.txt": b"v2", "new.txt": b"new",
    }
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_user_file_added_to_a_saealign_folder_blocks_the_replace(tmp_path: Path) -> None:
    final = tmp_path / "out"
    write(final, **{"scores.json": "{}"})
    (final / "my_analysis.ipynb").write_text("precious")
    before = snapshot(final)
    with pytest.raises(SaealignError, match=r"my_analysis\.ipynb"):
        write(final, **{"scores.json": "{1}"})
    assert snapshot(final) == before


def test_a_file_appearing_during_the_work_blocks_the_swap(tmp_path: Path) -> None:
    final = tmp_path / "out"
    write(final, **{"a.txt": "1"})
    with pytest.raises(SaealignError, match="late.txt"), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("2")
        (final / "late.txt").write_text("the user's")
    assert (final / "late.txt").read_text() == "the user's" and (final / "a.txt").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_empty_folder_is_filled(tmp_path: Path) -> None:
    final = tmp_path / "empty"
    final.mkdir()
    write(final, **{"a.txt": "a"})
    assert (final / "a.txt").read_text() == "a"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_both_swap_paths_give_the_same_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(cache, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    write(final, **{"a.txt": "1"})
    write(final, **{"b.txt": "2"})
    assert sorted(p.name for p in final.iterdir()) == [OWNED_FILE, "b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path: Path) -> None:
    final = tmp_path / "out"
    write(final, **{"a.txt": "1"})
    before = snapshot(final)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt
    assert snapshot(final) == before and sorted(os.listdir(tmp_path)) == ["out"]


def test_file_link_and_working_folder_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "scores.csv").write_text("x")
    with pytest.raises(SaealignError, match="is a file, not a folder"):
        check_replaceable(tmp_path / "scores.csv")
    with pytest.raises(SaealignError, match="is a file, not a folder"):
        check_replaceable(tmp_path / "scores.csv" / "below")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(SaealignError, match="symbolic link"):
        check_replaceable(tmp_path / "link")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for spec in (".", str(work), ".."):
        with pytest.raises(SaealignError, match="working folder"):
            check_replaceable(Path(spec))
    assert (tmp_path / "scores.csv").read_text() == "x" and work.is_dir()


def test_a_link_inside_counts_as_a_user_file(tmp_path: Path) -> None:
    final = tmp_path / "out"
    write(final, **{"a.txt": "1"})
    (final / "elsewhere").symlink_to(tmp_path)
    assert foreign_files(final) == ["elsewhere"]


def test_atomic_write_bytes_refuses_a_folder(tmp_path: Path) -> None:
    user_folder(tmp_path / "d")
    with pytest.raises(SaealignError, match="is a folder, not a file"):
        atomic_write_bytes(tmp_path / "d", b"x")
    atomic_write_bytes(tmp_path / "f.bin", b"1")
    atomic_write_bytes(tmp_path / "f.bin", b"2")
    assert (tmp_path / "f.bin").read_bytes() == b"2" and sorted(os.listdir(tmp_path)) == ["d", "f.bin"]


# -- the two writers the issue named: TopicScores.save (score -o, generate --scores) and SAE.save ----
def tiny_scores() -> TopicScores:
    n = 4
    return TopicScores(np.linspace(0, 1, n), np.arange(n, dtype=float), np.full(n, 30), np.ones(n, bool), ["t"])


def test_topic_scores_save_keeps_a_user_folder(tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "results")
    before = snapshot(folder)
    with pytest.raises(SaealignError, match="did not write"):
        tiny_scores().save(folder)
    assert snapshot(folder) == before
    with pytest.raises(SaealignError, match="is a file"):
        tiny_scores().save(folder / "notes.txt")
    saved = tiny_scores().save(folder / "scores")  # a new folder inside is fine, and so is re-saving it
    tiny_scores().save(saved)
    assert np.array_equal(TopicScores.load(saved).scores, tiny_scores().scores)
    assert snapshot(folder) == before | {k: v for k, v in snapshot(folder).items() if k.startswith("scores/")}


def test_sae_save_keeps_a_user_folder_and_replaces_its_own(tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "sae")
    with pytest.raises(SaealignError, match="did not write"):
        make_sae().save(folder)
    assert (folder / "notes.txt").exists() and not (folder / CFG_FILE).exists()
    own = make_sae().save(tmp_path / "mine")
    make_sae(seed=2).save(own)
    assert sorted(p.name for p in own.iterdir()) == sorted([OWNED_FILE, CFG_FILE, WEIGHTS_FILE])
