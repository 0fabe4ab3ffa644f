"""The ``saealign`` command in-process: a tiny saved model, SAE and corpus; one clean error line per mistake."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

import saealign.reference.workers as workers_module
from conftest import make_llama, make_sae, make_texts, make_tokenizer
from saealign.cache import cache_root
from saealign.cli.app import main
from saealign.reference.embed import Embedder, HashingEmbedder
from saealign.reference.scoring import TopicScores
from saealign.sae.autoencoder import SAE, SAEConfig, sae_key
from saealign.steering.spec import DEFAULT_METHOD

N_CORPUS = 60
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+")  # a tqdm bar
REAL_DEFAULT = Embedder.__dict__["default"]  # the classmethod, to restore it in the one test that needs MiniLM


@dataclass(frozen=True)
class Files:
    root: Path
    model: Path
    sae: Path
    other_sae: Path
    narrow_sae: Path
    corpus: Path
    topic: Path
    index: Path
    other_scores: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """Everything on disk, and the reference index built once through the CLI (hashing embedder)."""
    root = tmp_path_factory.mktemp("cli")
    model = root / "model"
    llama: Any = make_llama()  # a LlamaForCausalLM, typed as nn.Module by conftest
    llama.save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    sae, other = make_sae(), make_sae(seed=2)
    sae.save(root / "sae")
    other.save(root / "other_sae")
    SAE(SAEConfig(d_in=32, d_sae=64, activation="relu", hook_layer=0)).save(root / "narrow_sae")
    (root / "corpus.txt").write_text("\n".join(make_texts(N_CORPUS, seed=5, min_words=4, max_words=12)) + "\n")
    (root / "topic.txt").write_text("the cat sat on the old house\na small dog runs near the river\n")
    d = other.d_sae
    TopicScores(np.ones(d, np.float32), np.zeros(d), np.full(d, 30), np.ones(d, bool), ["x"],
                sae_key=sae_key(other)).save(root / "other_scores")
    f = Files(root, model, root / "sae", root / "other_sae", root / "narrow_sae", root / "corpus.txt",
              root / "topic.txt", root / "index", root / "other_scores")
    with pytest.MonkeyPatch.context() as mp:
        fake_embedder(mp, root)
        result = run("index", "build", "--model", f.model, "--sae", f.sae, "--corpus", f.corpus, "--out", f.index)
        assert result.exit_code == 0, result.output
    return f


def fake_embedder(mp: pytest.MonkeyPatch, root: Path) -> None:
    mp.setenv("SAEALIGN_CACHE", str(root / "cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(Embedder, "default", classmethod(lambda cls, device=None: HashingEmbedder()))


@pytest.fixture(autouse=True)
def offline_and_fast(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_embedder(monkeypatch, files.root)


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def stack(f: Files) -> list[object]:
    return ["--model", f.model, "--sae", f.sae, "--index", f.index]


def assert_one_error_line(result: Result, *needles: str) -> str:
    """Exit != 0 through click (no escaped exception), and the whole output one ``Error:`` line.

    Progress bars (transformers' "Loading weights" on stderr) are not counted as output lines.
    """
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- the happy paths --------------------------------------------------------------------------------
def test_index_build_reports_and_reruns_from_disk(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a finished index was recomputed")

    monkeypatch.setattr(workers_module, "prompt_statistics", never)  # the step every shard build runs
    result = run("index", "build", "--model", files.model, "--sae", files.sae, "--corpus", files.corpus,
                 "--out", files.index)
    assert result.exit_code == 0, result.output
    assert f"{N_CORPUS} prompts, layer 0" in result.output and str(files.index) in result.output
    assert json.loads((files.index / "manifest.json").read_text())["complete"] is True


def test_score_json_table_and_saved_scores(files: Files, tmp_path: Path) -> None:
    args = ["score", *stack(files), "--topic-file", files.topic, "--top", 3, "--min-prompts", 2]
    result = run(*args, "--json", "-o", tmp_path / "scores")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["layer"], out["topic_texts"], len(out["top"])) == (0, 2, 3)
    scores = [r["score"] for r in out["top"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
    assert all(r["prompts"] >= 2 and len(r["examples"]) == 2 for r in out["top"])
    saved = TopicScores.load(tmp_path / "scores")
    assert saved.top(3) == [r["latent"] for r in out["top"]]
    assert saved.sae_key == sae_key(make_sae()) and saved.min_prompts == 2 and saved.topic_texts == [
        "the cat sat on the old house", "a small dog runs near the river"]
    table = run(*args)
    assert table.exit_code == 0, table.output
    assert "latent" in table.output and str(out["top"][0]["latent"]) in table.output


def test_generate_json_and_side_by_side(files: Files) -> None:
    args = ["generate", *stack(files), "--topic-file", files.topic, "--max-new-tokens", 4, "--greedy"]
    result = run(*args, "--json", "the cat sat on the")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert {"prompt", "method", "mode", "text", "contamination", "token_contamination"} <= set(row)
    assert (row["prompt"], row["method"], row["mode"]) == ("the cat sat on the", DEFAULT_METHOD, "error")
    assert len(row["token_contamination"]) == 4 and all(0.0 <= c <= 1.0 for c in row["token_contamination"])
    assert row["contamination"] == pytest.approx(sum(row["token_contamination"]) / 4)
    assert row["strength"] == 0.05  # no --strength: the default method's default
    view = run(*args, "--strength", "auto", "the cat sat on the")
    assert view.exit_code == 0, view.output
    assert "the cat sat on the" in view.output and "unsteered" in view.output
    assert "strength auto -> " in view.output  # the automatic choice is reported (on stderr)
    fixed = json.loads(run(*args, "--json", "--strength", "2", "the cat sat on the").stdout.strip())
    assert fixed["strength"] == 2.0
    # a tuned mix steers differently, and the side-by-side view's unsteered row still runs
    tuned = run(*args, "--tune-steps", "3", "the cat sat on the")
    assert tuned.exit_code == 0, tuned.output
    assert "unsteered" in tuned.output
    tuned_row = json.loads(run(*args, "--json", "--strength", "2", "--tune-steps", "3", "the cat sat on the").stdout)
    assert tuned_row["strength"] == 2.0 and tuned_row["token_contamination"] != fixed["token_contamination"]
    assert_one_error_line(run(*args, "--strength", "strong", "a dog"), "strength must be a number or 'auto'")
    assert_one_error_line(run(*args, "--strength", "inf", "a dog"), f"strength for {DEFAULT_METHOD} must be between 0 and")


def test_info_prints_layers_and_width(files: Files) -> None:
    result = run("info", "--model", files.model, "--sae", files.sae)
    assert result.exit_code == 0, result.output
    assert "2 layers" in result.output and "d_sae 256" in result.output and "layer 0" in result.output


@pytest.mark.real
def test_score_with_the_real_embedder(files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Embedder, "default", REAL_DEFAULT)
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))
    result = run("score", "--model", files.model, "--sae", files.sae, "--corpus", files.corpus, "--topic-file",
                 files.topic, "--top", 3, "--min-prompts", 2, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["top"]) == 3
    manifest = json.loads(next((cache_root() / "index").glob("*/manifest.json")).read_text())
    assert manifest["keys"]["embedder"] != HashingEmbedder().fingerprint  # MiniLM, not the stand-in


# -- mistakes: one line each ------------------------------------------------------------------------
def test_bad_topic_files(files: Files, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_error_line(run("score", *stack(files), "--topic-file", empty), "empty.txt has no texts")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"the cat\n\xff\xfe\x00 dog\n")
    assert_one_error_line(run("score", *stack(files), "--topic-file", binary), "binary.txt line 2 is not UTF-8")
    assert_one_error_line(run("score", *stack(files)), "give the topic")
    assert_one_error_line(run("score", *stack(files), "--topic-file", tmp_path / "nope.txt"), "nope.txt not found")


def test_bad_generation_options(files: Files) -> None:
    base = ["generate", *stack(files), "--method", "none"]
    assert_one_error_line(run(*base, "--max-new-tokens", 0, "a dog"), "max_new_tokens must be at least 1")
    assert_one_error_line(run(*base, "--max-new-tokens", 126, "a dog"), "context of 128 tokens")
    assert_one_error_line(run(*base, "  "), "prompt 0 is empty")
    assert_one_error_line(run(*base), "give at least one prompt")
    assert_one_error_line(run("generate", *stack(files), "--scores", files.other_scores, "a dog"), "re-score")
    assert_one_error_line(run("generate", *stack(files), "a dog"), "needs a topic")


def test_unknown_method_is_a_usage_error(files: Files) -> None:
    # click prints usage errors as "Usage: ... / Try ... / Error: ..." (exit 2): the error is the last line
    result = run("generate", *stack(files), "--method", "steer", "a dog")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: Invalid value for '--method'") and "'steer'" in last


def test_bad_model_sae_layer_and_index(files: Files, tmp_path: Path) -> None:
    topic = ["--topic-file", files.topic]
    missing = tmp_path / "no-model"
    assert_one_error_line(run("score", "--model", missing, "--sae", files.sae, "--index", files.index, *topic),
                          str(missing))
    assert_one_error_line(run("score", "--model", files.model, "--sae", files.narrow_sae, "--index", files.index,
                              *topic), "d_in=32", "hidden size 64")
    assert_one_error_line(run("info", "--model", files.model, "--sae", tmp_path / "no-sae"), "no SAE at")
    assert_one_error_line(run("score", "--model", files.model, "--sae", files.other_sae, "--index", files.index,
                              *topic), "built for SAE")
    assert_one_error_line(run("index", "build", "--model", files.model, "--sae", files.other_sae, "--corpus",
                              files.corpus, "--out", files.index), "built from other inputs", "sae ")
    assert_one_error_line(run("score", *stack(files), "--layer", 1, *topic), "built for layer 0, not 1")
    assert_one_error_line(run("score", *stack(files), "--summary", "median", *topic), "unknown summary")
    assert_one_error_line(run("score", "--model", files.model, "--sae", files.sae, "--index", tmp_path / "none",
                              *topic), "no index at")


def test_layer_out_of_range_fails_cleanly_and_leaves_nothing_behind(files: Files, tmp_path: Path) -> None:
    out = tmp_path / "index"
    build = ["index", "build", "--model", files.model, "--sae", files.sae, "--corpus", files.corpus, "--out", out]
    assert_one_error_line(run(*build, "--layer", 5), "layer 5 is out of range", "0..1")
    result = run(*build)
    assert result.exit_code == 0, result.output


def test_generate_from_a_score_csv_with_companion_layers_needs_the_texts(files: Files, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores alone (a CSV) steer one layer; the companions' push reads the topic texts, so asking for it without them
    is one error line before any generation, and ``--companion-push 0`` steers."""
    import saealign.cli.align as align_cli
    from saealign.reference.authors_csv import write_authors_csv
    from saealign.steering.aligner import Aligner

    real = align_cli.load_aligner

    def with_a_companion(*args: Any) -> Aligner:
        plain = real(*args)
        return Aligner(plain.lm, plain.sae, plain.layer, plain.index, plain.embedder, companions=[(make_sae(seed=4), 1)])

    monkeypatch.setattr(align_cli, "load_aligner", with_a_companion)
    d = make_sae().d_sae
    scores = TopicScores(np.linspace(0, 1, d, dtype=np.float32), np.zeros(d), np.full(d, 30), np.ones(d, bool), [],
                         sae_key=sae_key(make_sae()))
    csv = write_authors_csv(scores, tmp_path / "scores.csv")
    args = ["generate", *stack(files), "--scores", csv, "--no-contrast", "--no-output-match", "--max-new-tokens", 3,
            "--greedy", "--json"]
    assert_one_error_line(run(*args, "the cat sat on the"), "holds scores only", "--companion-push 0")
    steered = run(*args, "--companion-push", "0", "the cat sat on the")
    assert steered.exit_code == 0, steered.output
    assert json.loads(steered.stdout.strip())["strength"] == 0.05
