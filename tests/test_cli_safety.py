"""The CLI under hostile input (issue 14): nothing lost, one line per mistake, checked before the model loads.

A tiny saved model, SAE and index (hashing embedder); ``load_aligner`` is watched so a test can prove
that a refusal came before any model was loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

import saealign.cli.align as align_cli
from conftest import make_llama, make_sae, make_texts, make_tokenizer
from saealign.cli.app import main
from saealign.cli.common import json_line
from saealign.reference.authors_csv import read_authors_csv
from saealign.reference.embed import Embedder, HashingEmbedder
from saealign.reference.scoring import TopicScores
from saealign.steering.aligner import Aligner
from saealign.steering.spec import DEFAULT_METHOD


@dataclass(frozen=True)
class Files:
    root: Path
    model: Path
    sae: Path
    index: Path
    topic: Path


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def offline(mp: pytest.MonkeyPatch, root: Path) -> None:
    mp.setenv("SAEALIGN_CACHE", str(root / "cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(Embedder, "default", classmethod(lambda cls, device=None: HashingEmbedder()))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("cli_safety")
    llama: Any = make_llama()
    llama.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    make_sae().save(root / "sae")
    (root / "corpus.txt").write_text("\n".join(make_texts(60, seed=5, min_words=4, max_words=12)) + "\n")
    (root / "topic.txt").write_text("the cat sat on the old house\na small dog runs near the river\n")
    f = Files(root, root / "model", root / "sae", root / "index", root / "topic.txt")
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, root)
        result = run("index", "build", "--model", f.model, "--sae", f.sae, "--corpus", root / "corpus.txt",
                     "--out", f.index)
        assert result.exit_code == 0, result.output
    return f


@pytest.fixture(autouse=True)
def watched(files: Files, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Offline and fast; returns the list of models loaded during the test."""
    offline(monkeypatch, files.root)
    loads: list[str] = []
    real = align_cli.load_aligner

    def load(model: str, *args: Any) -> Aligner:
        loads.append(model)
        return real(model, *args)

    monkeypatch.setattr(align_cli, "load_aligner", load)
    return loads


def stack(f: Files) -> list[object]:
    return ["--model", f.model, "--sae", f.sae, "--index", f.index]


def one_error(result: Result, *needles: str) -> str:
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def user_folder(path: Path) -> dict[str, str]:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub" / "data.csv").write_text("a,b\n")
    return {p.relative_to(path).as_posix(): p.read_text() for p in path.rglob("*") if p.is_file()}


# -- 1. data loss ----------------------------------------------------------------------------------------
def test_score_into_a_user_folder_is_refused_before_the_model_loads(files: Files, tmp_path: Path,
                                                                    watched: list[str]) -> None:
    before = user_folder(tmp_path / "results")
    one_error(run("score", *stack(files), "--topic-file", files.topic, "-o", tmp_path / "results"),
              "notes.txt", "did not write")
    assert {p.relative_to(tmp_path / "results").as_posix(): p.read_text()
            for p in (tmp_path / "results").rglob("*") if p.is_file()} == before
    assert watched == []


def test_score_into_a_file_or_the_working_folder_is_one_line(files: Files, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, watched: list[str]) -> None:
    (tmp_path / "scores").write_text("x")
    one_error(run("score", *stack(files), "--topic-file", files.topic, "-o", tmp_path / "scores"), "is a file")
    monkeypatch.chdir(tmp_path)
    one_error(run("score", *stack(files), "--topic-file", files.topic, "-o", "."), "working folder")
    assert (tmp_path / "scores").read_text() == "x" and watched == []


def test_score_rewrites_its_own_folder(files: Files, tmp_path: Path) -> None:
    args = ["score", *stack(files), "--topic-file", files.topic, "--min-prompts", 2, "-o", tmp_path / "s"]
    assert run(*args).exit_code == 0
    result = run(*args)
    assert result.exit_code == 0 and f"saved scores to {tmp_path / 's'}" in result.output
    assert sorted(os.listdir(tmp_path)) == ["s"]


# -- 8. the authors' CSV through the CLI ---------------------------------------------------------------------
def test_score_csv_equals_the_saved_scores_and_generate_reads_it(files: Files, tmp_path: Path) -> None:
    result = run("score", *stack(files), "--topic-file", files.topic, "--min-prompts", 2,
                 "-o", tmp_path / "s", "--csv", tmp_path / "s.csv")
    assert result.exit_code == 0, result.output
    assert f"saved the scores CSV to {tmp_path / 's.csv'}" in result.output
    saved, imported = TopicScores.load(tmp_path / "s"), read_authors_csv(tmp_path / "s.csv")
    assert np.array_equal(saved.scores, imported.scores) and np.array_equal(saved.scored, imported.scored)
    # generating from the CSV is generating from the folder: same scores, same steering
    gen = ["generate", *stack(files), "the cat", "--strength", 1, "--greedy", "--max-new-tokens", 4, "--json",
           "--no-contrast", "--no-output-match"]  # the CSV holds scores only: no texts to measure either on
    from_csv, from_folder = run(*gen, "--scores", tmp_path / "s.csv"), run(*gen, "--scores", tmp_path / "s")
    assert from_csv.exit_code == 0, from_csv.output
    assert json.loads(from_csv.stdout)["text"] == json.loads(from_folder.stdout)["text"]


def test_csv_scores_without_texts_cannot_search_auto(files: Files, tmp_path: Path, watched: list[str]) -> None:
    (tmp_path / "s.csv").write_text("latent,score\n" + "".join(f"{i},0.5\n" for i in range(256)))
    one_error(run("generate", *stack(files), "the cat", "--strength", "auto", "--scores", tmp_path / "s.csv"),
              "--strength NUMBER")
    one_error(run("generate", *stack(files), "the cat", "--scores", tmp_path / "s.csv"), "--no-contrast")
    one_error(run("generate", *stack(files), "the cat", "--no-contrast", "--feedback", "--scores", tmp_path / "s.csv"),
              "--no-feedback")
    one_error(run("generate", *stack(files), "the cat", "--no-contrast", "--scores", tmp_path / "s.csv"),
              "--no-output-match")
    assert watched == []


def test_csv_of_another_width_is_one_line(files: Files, tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text("0.5\n0.25\n")
    one_error(run("generate", *stack(files), "the cat", "--strength", 1, "--no-contrast", "--no-output-match",
                  "--scores", tmp_path / "s.csv"), "2 latents", "re-score")


def test_score_csv_never_overwrites_a_user_file(files: Files, tmp_path: Path, watched: list[str]) -> None:
    (tmp_path / "mine.csv").write_text("name,value\n")
    one_error(run("score", *stack(files), "--topic-file", files.topic, "--csv", tmp_path / "mine.csv"),
              "not a score CSV saealign wrote")
    assert (tmp_path / "mine.csv").read_text() == "name,value\n" and watched == []


# -- 4. absurd strengths, JSON without Infinity ------------------------------------------------------------
@pytest.mark.parametrize("strength", ["inf", "-inf", "nan", "1e308", "-1", "9"])
def test_absurd_strengths_are_refused_before_the_model_loads(files: Files, strength: str, watched: list[str]) -> None:
    one_error(run("generate", *stack(files), "the cat", "--topic-file", files.topic, "--method", "swap",
                  "--strength", strength), "strength for swap must be between 0 and 8")
    if strength == "9":  # the default method's own range is checked too
        one_error(run("generate", *stack(files), "the cat", "--topic-file", files.topic, "--strength", "3"),
                  f"strength for {DEFAULT_METHOD} must be between 0 and 2")
    assert watched == []


def test_a_bad_prompt_boost_is_refused_before_the_model_loads(files: Files, watched: list[str]) -> None:
    one_error(run("generate", *stack(files), "the cat", "--topic-file", files.topic, "--prompt-boost", "-1"),
              "prompt_boost must be a number from 0 to 10")
    one_error(run("generate", *stack(files), "the cat", "--topic-file", files.topic, "--strength", "1.5",
                  "--prompt-boost", "2"), "pushes the prompt past add's largest strength")
    assert watched == []


def test_bad_tune_steps_are_refused_before_the_model_loads(files: Files, watched: list[str]) -> None:
    one_error(run("generate", *stack(files), "the cat", "--topic-file", files.topic, "--tune-steps", "-2"),
              "tune_steps must be a whole number from 0 to 200")
    one_error(run("generate", *stack(files), "the cat", "--topic-file", files.topic, "--method", "swap",
                  "--tune-steps", "3"), "tune_steps tunes add's mix of latents; swap has none")
    assert watched == []


def test_a_bad_slot_push_is_refused_before_the_model_loads(files: Files, watched: list[str]) -> None:
    one_error(run("generate", *stack(files), "the cat", "--topic-file", files.topic, "--slot-push", "-1"),
              "slot_push must be a number from 0 to 4")
    assert watched == []


def test_strength_help_prints_no_double_percent() -> None:
    result = run("generate", "--help")
    assert result.exit_code == 0 and "%%" not in result.output and "--strength" in result.output


def test_json_line_prints_standard_json() -> None:
    line = json_line({"a": float("inf"), "b": [float("nan"), np.float32(0.5), np.int64(3)], "c": True, "d": None})
    assert line == '{"a": null, "b": [null, 0.5, 3], "c": true, "d": null}'
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


# -- 6. smaller items --------------------------------------------------------------------------------------
def test_prompts_file_keeps_duplicates(files: Files, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("the cat\n\nthe cat\na dog\n")
    result = run("generate", *stack(files), "--method", "none", "--prompts-file", tmp_path / "p.txt",
                 "--greedy", "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["the cat", "the cat", "a dog"]


@pytest.mark.parametrize(("content", "needle"), [(None, "not found"), (b"\n \n", "has no prompts"),
                                                 (b"ok\n\xff\n", "line 2 is not UTF-8")])
def test_prompts_file_errors_name_the_prompts_file(files: Files, tmp_path: Path, content: bytes | None,
                                                   needle: str, watched: list[str]) -> None:
    if content is not None:
        (tmp_path / "p.txt").write_bytes(content)
    message = one_error(run("generate", *stack(files), "--method", "none", "--prompts-file", tmp_path / "p.txt"),
                        "prompts file", needle)
    assert "topic" not in message and watched == []


def test_missing_model_path_is_a_missing_path(files: Files, tmp_path: Path) -> None:
    one_error(run("generate", "--model", tmp_path / "no_model", "--sae", files.sae, "--index", files.index,
                  "--method", "none", "the cat"), f"no model at {tmp_path / 'no_model'}", "does not exist")


def test_topic_file_errors_come_before_the_model_load(files: Files, tmp_path: Path, watched: list[str]) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    for topic, needle in ((tmp_path / "none.txt", "not found"), (tmp_path / "empty.txt", "has no texts")):
        one_error(run("generate", *stack(files), "the cat", "--topic-file", topic), "topic file", needle)
    assert watched == []


def test_too_long_a_generation_is_refused_before_the_strength_search(files: Files,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_search(*args: object, **kwargs: object) -> None:
        raise AssertionError("the strength search ran before max_new_tokens was checked")

    monkeypatch.setattr(Aligner, "auto_strength", no_search)
    one_error(run("generate", *stack(files), "the cat", "--topic-file", files.topic, "--max-new-tokens", 500),
              "max_new_tokens is 500", "context of 128 tokens")


def test_gpt2_preset_offline_says_a_hub_is_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it too
    one_error(run("generate", "--sae", "gpt2-small-oai-v5-32k:9", "--method", "none", "the cat"),
              "SAE preset gpt2-small-oai-v5-32k:9", "needs the Hugging Face hub", "autoencoders/9.pt")
