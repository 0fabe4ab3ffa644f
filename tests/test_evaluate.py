"""The evaluation: metrics equal hand computations, reports read back, experiments end to end on tiny models."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner, Result

from conftest import TinyLoader, build_tiny_index, make_sae, make_texts
from saealign.cli.app import main
from saealign.errors import SaealignError
from saealign.evaluate.conditions import ConditionInputs
from saealign.evaluate.generation import GenerationSetup, evaluate_generations
from saealign.evaluate.metrics import (
    continuation_nll,
    distinct_n,
    per_text_perplexity,
    perplexity,
    topic_distance,
)
from saealign.evaluate.report import markdown_table, scatter_plot, write_rows
from saealign.evaluate.topic_signal import medical_mass_ratio
from saealign.evaluate.topics import split
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.reference.index import IndexKeys, ReferenceIndex
from saealign.reference.scoring import TopicScores
from saealign.sae.autoencoder import SAE
from saealign.steering.aligner import Aligner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Word-level tokenizer: a leading space makes the prompt's ids a clean prefix of prompt + continuation.
PAIRS = [
    ("the cat", " sat on the old house"),
    ("a dog", " runs"),
    ("the sun shines over the river and", " the moon is cold"),
]
N_CORPUS = 48  # enough prompts for latents firing on >= 20 of them (Aligner.topic's min_prompts)


# -- metrics ------------------------------------------------------------------------------------------
def hand_nll(lm: LoadedModel, prompt: str, text: str) -> tuple[float, int]:
    """Full forward of prompt + text alone, summed NLL of the tokens after the prompt's ids."""
    tok = lm.tokenizer
    p_ids, full = tok(prompt)["input_ids"], tok(prompt + text)["input_ids"]
    assert full[: len(p_ids)] == p_ids
    with torch.inference_mode():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([full])).logits[0].float(), dim=-1)
    return -sum(float(logp[j - 1, full[j]]) for j in range(len(p_ids), len(full))), len(full) - len(p_ids)


def test_continuation_nll_equals_hand_computation_and_ignores_padding(tiny_lm: LoadedModel) -> None:
    prompts, texts = [p for p, _ in PAIRS], [t for _, t in PAIRS]
    batched = continuation_nll(tiny_lm, prompts, texts)
    split = continuation_nll(tiny_lm, prompts, texts, batch=2)  # batches of 2 + 1: other padding widths
    alone = [continuation_nll(tiny_lm, [p], [t])[0] for p, t in PAIRS]
    assert [c for _, c in batched] == [5, 1, 4]  # one token a word
    for (prompt, text), b, s, a in zip(PAIRS, batched, split, alone, strict=True):
        want, count = hand_nll(tiny_lm, prompt, text)
        assert b[1] == s[1] == a[1] == count
        assert want > 0
        np.testing.assert_allclose([b[0], s[0], a[0]], want, rtol=1e-5)


def test_continuation_nll_boundary_merge_and_empty_text(tiny_lm: LoadedModel) -> None:
    tok = tiny_lm.tokenizer
    # "the cat" + "sat" tokenises as <s> the <unk>: scoring starts at the first id that differs
    merged = tok("the catsat")["input_ids"]
    assert merged[:2] == tok("the cat")["input_ids"][:2] and len(merged) == 3
    (nll, count), (empty_nll, empty_count) = continuation_nll(tiny_lm, ["the cat", "a dog"], ["sat", ""])
    with torch.inference_mode():
        logp = torch.log_softmax(tiny_lm.model(input_ids=torch.tensor([merged])).logits[0].float(), dim=-1)
    assert count == 1
    assert nll == pytest.approx(-float(logp[1, merged[2]]), rel=1e-5)
    assert (empty_nll, empty_count) == (0.0, 0)


def test_perplexity_is_token_weighted() -> None:
    assert perplexity([(math.log(2) * 3, 3)]) == pytest.approx(2.0, rel=1e-12)
    # token-weighted, not a mean of per-text perplexities: exp((2 ln 3 + 0) / 2) = 3
    assert perplexity([(2 * math.log(3), 1), (0.0, 1)]) == pytest.approx(3.0, rel=1e-12)
    assert per_text_perplexity([(2 * math.log(3), 1), (0.0, 1)]) == pytest.approx([9.0, 1.0], rel=1e-12)
    assert math.isnan(perplexity([]))
    assert math.isnan(perplexity([(0.0, 0)]))
    assert math.isnan(per_text_perplexity([(0.0, 0)])[0])


def test_distinct_n_by_hand() -> None:
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)  # n-grams pooled over texts
    assert distinct_n(["a b a"], 1) == pytest.approx(2 / 3)
    assert distinct_n(["a b c"], 3) == 1.0
    assert distinct_n(["a"], 2) == 0.0  # no bigram at all
    assert distinct_n([], 2) == 0.0
    assert distinct_n([""], 2) == 0.0


def test_topic_distance_by_hand() -> None:
    emb = HashingEmbedder()
    topic = ["the cat sat", "a dog runs"]
    topic_emb = emb.embed(topic)
    texts = ["the cat sat", "", "fish swims near the river", "a dog runs fast"]
    got = topic_distance(emb, texts, topic_emb)
    assert got.shape == (4,)
    assert got[0] == pytest.approx(0.0, abs=1e-3)  # identical text
    # an empty generation is embedded as "." (not an error), so it gets an ordinary finite distance
    assert got[1] == pytest.approx(topic_distance(emb, ["."], topic_emb)[0], abs=1e-6)
    assert np.isfinite(got).all()
    e = emb.embed(texts).astype(np.float64)
    hand = np.linalg.norm(e[:, None, :] - topic_emb[None].astype(np.float64), axis=2).min(axis=1)
    hand[1] = np.linalg.norm(emb.embed(["."])[0] - topic_emb, axis=1).min()
    np.testing.assert_allclose(got, hand, atol=1e-3)


# -- topic signal ---------------------------------------------------------------------------------------
def hand_index(act_sum: np.ndarray, labels: list[str]) -> ReferenceIndex:
    """A ReferenceIndex built in memory from a dense ``[P, L]`` act_sum (as bench_scoring.py does)."""
    csr = sp.csr_matrix(act_sum.astype(np.float32))
    n = act_sum.shape[0]
    keys = IndexKeys(model="m", sae="s", layer=0, corpus="c", embedder="e")
    return ReferenceIndex.from_statistics(csr, csr.data.copy(), np.full(n, 5, dtype=np.int32), np.eye(n, 8),
                                          [f"p{i}" for i in range(n)], labels, keys)


def test_medical_mass_ratio_by_hand() -> None:
    act = np.array([[1, 0, 2], [0, 3, 1], [2, 0, 0], [0, 1, 4]], dtype=np.float32)  # row sums 3 4 2 5 = 14
    index = hand_index(act, ["anatomy", "virology", "professional_law", "philosophy"])
    # latent 2 has the best score but is unscored: top() must skip it
    scores = TopicScores(np.array([1.0, 0.5, 0.9]), np.array([0.1, 0.2, 0.0]), np.array([20, 20, 3]),
                         np.array([True, True, False]), ["topic"])
    one = medical_mass_ratio(index, scores, top=1)  # latent 0: mass 1 on medical prompts of 3
    assert one["top_share"] == pytest.approx(1 / 3)
    assert one["base_share"] == pytest.approx(7 / 14)
    assert one["ratio"] == pytest.approx((1 / 3) / 0.5)
    assert (one["top"], one["prompt_share"], one["medical_prompts"], one["prompts"]) == (1.0, 0.5, 2.0, 4.0)
    two = medical_mass_ratio(index, scores, top=2)  # latents 0, 1: per-prompt mass 1 3 2 1
    assert two["top_share"] == pytest.approx(4 / 7)
    assert two["ratio"] == pytest.approx(8 / 7)
    other = medical_mass_ratio(index, scores, top=1, labels=("professional_law",))
    assert other["top_share"] == pytest.approx(2 / 3) and other["base_share"] == pytest.approx(2 / 14)


# -- reports ------------------------------------------------------------------------------------------
def test_markdown_table_formats() -> None:
    rows = [
        {"name": "swap", "x": 1.23456, "x_std": 0.1, "y": float("nan"), "n": 3},
        {"name": "none", "x": 12345.6, "x_std": 0.0, "y": 0.5},
    ]
    lines = markdown_table(rows, ["name", "x", "y", "n"]).splitlines()
    assert lines == [
        "| name | x | y | n |",
        "|---|---|---|---|",
        "| swap | 1.235 ± 0.100 | nan | 3 |",
        "| none | 1.23e+04 | 0.500 |  |",  # zero std: no "±"; a missing column is empty
    ]
    assert markdown_table(rows[:1], ["x"], digits=1).splitlines()[2] == "| 1.2 ± 0.1 |"


def test_write_rows_reads_back(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"a": 1, "b": 0.5}, {"a": 2, "c": "x y"}]
    out = tmp_path / "deep" / "out"
    write_rows(out, "table", rows, {"reference": {"k": [1, 2]}})
    assert json.loads((out / "table.json").read_text()) == {"rows": rows, "reference": {"k": [1, 2]}}
    with open(out / "table.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert back == [{"a": "1", "b": "0.5", "c": ""}, {"a": "2", "b": "", "c": "x y"}]
    write_rows(out, "empty", [])
    assert json.loads((out / "empty.json").read_text()) == {"rows": []}
    assert not (out / "empty.csv").exists()


def test_scatter_plot_writes_png(tmp_path: Path) -> None:
    rows = [
        {"ppl": 10.0, "ppl_std": 1.0, "distance": 0.9, "distance_std": 0.05, "label": "none"},
        {"ppl": 30.0, "distance": 0.7, "label": "swap"},  # no std: plain points
    ]
    path = tmp_path / "plots" / "p.png"
    assert scatter_plot(path, rows, "ppl", "distance", "label", "title", hline=0.6, hline_label="real", vline=20.0,
                        vline_label="bound") is True
    assert path.read_bytes()[:8] == PNG_MAGIC


# -- the topic split -----------------------------------------------------------------------------------
def test_topic_split_disjoint_sizes_and_errors() -> None:
    texts = [f"text {i}" for i in range(10)]
    topic, held = split(texts, 3, 4)
    assert len(topic) == 3 and len(held) == 4
    assert not set(topic) & set(held) and set(topic + held) <= set(texts)
    assert split(texts, 3, 4) == (topic, held)  # seeded
    assert split(texts, 10, 0)[1] == []
    with pytest.raises(SaealignError, match="has 6 texts; at least 8 are needed"):
        split(texts[:6], 3, 4)


def test_topic_split_is_disjoint_in_content_with_duplicates() -> None:
    texts = [f"text {i}" for i in range(5)] * 2
    topic, held = split(texts, 3, 2)
    assert not set(topic) & set(held)


# -- experiments end to end on the tiny model -------------------------------------------------------------
@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(scope="module")
def index(tiny_lm: LoadedModel, sae: SAE, tmp_path_factory: pytest.TempPathFactory) -> ReferenceIndex:
    texts = make_texts(N_CORPUS, seed=5, min_words=6, max_words=14)
    labels = ["anatomy" if i % 3 == 0 else "philosophy" for i in range(N_CORPUS)]
    built = build_tiny_index(tiny_lm, sae, tmp_path_factory.mktemp("eval-index"), texts, labels, shard_size=8)
    assert int((built.latent_n_prompts >= 20).sum()) > 0  # Aligner.topic's default min_prompts can score
    return built


TOPIC_TEXTS = ["the cat sat near the warm house", "a small bird sings in the tree", "the dog swims in the river",
               "cold rain falls on the old house"]
HELDOUT_TEXTS = ["the big cat runs over the house", "a bird sat in the green tree", "the fish swims in the water",
                 "the wind is cold"]
PROMPTS = ["the cat sat on the", "a dog"]


def test_evaluate_generations_end_to_end(tiny_lm: LoadedModel, sae: SAE, index: ReferenceIndex) -> None:
    emb = HashingEmbedder()
    setup = GenerationSetup(methods=("none", "swap"), modes=("error",), seeds=(0,), max_new_tokens=3)
    inputs = ConditionInputs(PROMPTS, TOPIC_TEXTS, HELDOUT_TEXTS, tiny_lm, emb, setup.seeds, setup.sampling)
    rows, reference = evaluate_generations(lambda layer: Aligner(tiny_lm, sae, layer, index, emb), [0], inputs, setup,
                                           progress=False)
    assert [(r["layer"], r["method"], r["mode"], r["strength"]) for r in rows] == [(0, "none", "error", 1.0),
                                                                                   (0, "swap", "error", 1.0)]
    metrics = ("distance", "ppl", "contamination", "distinct2", "changed")
    assert set(rows[0]) == ({"label", "kind", "layer", "method", "mode", "strength", "strength_used", "seconds"}
                            | set(metrics) | {f"{m}_std" for m in metrics})
    for r in rows:
        assert all(np.isfinite(r[m]) for m in metrics)
        assert all(r[f"{m}_std"] == 0.0 for m in metrics)  # one seed
        assert 0 <= r["distance"] <= 2 and r["ppl"] > 1 and 0 <= r["contamination"] <= 1
    assert rows[0]["changed"] == 0.0  # no steering edits nothing
    hand = float(np.mean(topic_distance(emb, TOPIC_TEXTS, emb.embed(HELDOUT_TEXTS))))
    assert reference["real_topic_text_distance"] == pytest.approx(hand)
    assert (reference["topic_texts"], reference["heldout_texts"]) == (4, 4)
    assert set(reference["samples"]) == {"L0 none error s1", "L0 swap error s1"}
    # the "none" row is the plain generation: its distance is that of the unsteered texts
    plain = Aligner(tiny_lm, sae, 0, index, emb).generate(PROMPTS, spec=setup.sampling, seed=0)
    assert [p + t for p, t in reference["samples"]["L0 none error s1"]] == [g.prompt + g.text for g in plain]


# -- the eval commands --------------------------------------------------------------------------------
def run(*args: object, obj: object = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], obj=obj)


def assert_one_error_line(result: Result, *needles: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_data(root: Path, n_medquad: int = 10) -> Path:
    (root / "topics").mkdir(parents=True)
    with gzip.open(root / "topics" / "medical_medquad.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in make_texts(n_medquad, seed=9, min_words=5, max_words=10):
            f.write(json.dumps({"text": t}) + "\n")
    (root / "topics" / "medical_metaphors.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def test_eval_commands_without_data_fail_in_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    assert_one_error_line(run("eval", "generation", "--data", missing), "shared data folder", "--data")
    assert_one_error_line(run("eval", "generation", "--data", empty), "medical_medquad.jsonl.gz not found")
    assert_one_error_line(run("eval", "topic-signal", "--data", missing), "--data")
    assert_one_error_line(run("eval", "topic-signal", "--data", empty), "medical_medquad.jsonl.gz not found")
    few = write_data(tmp_path / "few", n_medquad=5)
    assert_one_error_line(run("eval", "generation", "--data", few, "--n-topic", 4, "--n-heldout", 4), "has 5 texts")


@pytest.fixture
def tiny(tiny_lm: LoadedModel, sae: SAE, index: ReferenceIndex) -> Any:
    """Runs ``saealign`` with the eval commands on the tiny model, SAE, index and the hashing embedder."""
    return lambda *args: run(*args, obj=TinyLoader(tiny_lm, sae, index))


GEN_ARGS = ("--layers", 0, "--methods", "none,swap", "--modes", "error", "--n-topic", 4, "--n-heldout", 4,
            "--max-new-tokens", 3)


def test_eval_generation_command_writes_reports(tmp_path: Path, tiny: Any) -> None:
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    result = tiny("eval", "generation", "--data", data, *GEN_ARGS, "--seeds", "0,1", "--baselines", "", "--out", out)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "generation.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["none", "swap"]
    assert saved["setup"]["seeds"] == [0, 1] and saved["reference"]["heldout_texts"] == 4
    md = (out / "generation.md").read_text()
    assert "| label | distance | gap_closed | ppl | ppl_ratio |" in md and md in result.output
    assert (out / "generation.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "generation.csv").read_text().startswith("label,kind,layer,method,mode,strength,strength_used,seconds,distance")


def test_eval_generation_bad_seeds_is_one_line(tmp_path: Path, tiny: Any) -> None:
    data = write_data(tmp_path / "data")
    assert_one_error_line(tiny("eval", "generation", "--data", data, *GEN_ARGS, "--seeds", "zero", "--out", tmp_path),
                          "--seeds")


def test_eval_topic_signal_command_matches_the_library(tmp_path: Path, index: ReferenceIndex, tiny: Any) -> None:
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    result = tiny("eval", "topic-signal", "--data", data, "--layers", 0, "--n-topic", 4, "--top", 3, "--out", out)
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "topic_signal.json").read_text())["rows"]
    with gzip.open(data / "topics" / "medical_medquad.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    topic, _ = split(texts, 4, 0)
    scores = index.score(topic, HashingEmbedder())
    want = medical_mass_ratio(index, scores, 3)
    assert row["top_latents"] == scores.top(3)
    for key in ("top_share", "base_share", "ratio", "prompts", "medical_prompts"):
        assert row[key] == pytest.approx(want[key])
    assert row["medical_prompts"] == N_CORPUS // 3
    assert f"ratio {want['ratio']:.2f}" in result.output
    assert (out / "topic_signal.md").read_text().startswith("# Topic signal")
