"""The evaluation CLI end to end on tiny models: ``eval all --quick``, frontier, generation, cost, bad input.

Every command runs on the tiny random Llama, its SAE, a 48-prompt index and the hashing embedder
(nothing is downloaded), over a tiny shared-data folder written with the tiny tokenizer's words.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import saealign.cli.app as cli
from conftest import WORDS, RefusingLoader, TinyLoader, build_tiny_index, make_sae, make_texts
from saealign.errors import SaealignError
from saealign.evaluate.acceptability import SPLITS
from saealign.evaluate.run_all import SECTIONS
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.reference.index import ReferenceIndex
from saealign.sae.autoencoder import SAE
from saealign.steering.aligner import Aligner
from saealign.steering.spec import STRENGTH_RANGE, GenerationSpec
from saealign.steering.strength import AutoStrengthConfig

N_CORPUS = 48  # enough prompts for latents firing on >= 20 of them (Aligner.topic's min_prompts)
PROMPTS = ["the cat sat on the", "a dog runs"]
SMALL_AUTO = AutoStrengthConfig(n_prompts=4, max_new_tokens=4, strengths=(0.5, 1.0, 4.0))  # 0.5: add x boost 3 in range
MEDICAL_SUBJECTS = ("anatomy", "virology", "clinical_knowledge")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- the tiny stack and data ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(scope="module")
def index(tiny_lm: LoadedModel, sae: SAE, tmp_path_factory: pytest.TempPathFactory) -> ReferenceIndex:
    texts = make_texts(N_CORPUS, seed=5, min_words=6, max_words=14)
    labels = [MEDICAL_SUBJECTS[i % 3] if i % 2 == 0 else "philosophy" for i in range(N_CORPUS)]
    return build_tiny_index(tiny_lm, sae, tmp_path_factory.mktemp("eval-cli-index"), texts, labels, shard_size=16)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _cola_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Label 0 sentences carry two animal words, label 1 two sky words (as tests/test_acceptability.py)."""
    bad, good = ("cat", "dog", "bird", "fish"), ("sun", "moon", "star", "sky")
    filler = [w for w in WORDS if w not in bad + good]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sent = [rng.choice(filler) for _ in range(rng.randint(3, 6))]
        for _ in range(2):
            sent.insert(rng.randrange(len(sent) + 1), rng.choice(good if i % 2 else bad))
        rows.append({"text": " ".join(sent), "label": i % 2})
    return rows


TOPIC_WORDS = {  # each topic's texts use a few words: close to each other, far from the tiny LM's text
    "medical_medquad": ("water", "river", "rain", "snow", "cold", "falls", "fish", "swims"),
    "amazon_reviews": ("house", "tree", "green", "big", "old", "new", "grows"),
    "sycophancy_caa": ("sun", "moon", "star", "sky", "light", "shines", "warm"),
}


def topic_sentences(words: tuple[str, ...], n: int, seed: int) -> list[str]:
    """``n`` distinct sentences of 6-12 words drawn from ``words``."""
    rng, out = random.Random(seed), dict[str, None]()
    while len(out) < n:
        out[" ".join(rng.choice(words) for _ in range(rng.randint(6, 12)))] = None
    return list(out)


def write_data(root: Path, n_topic_texts: int = 24, n_medical: int = 250) -> Path:
    """A shared-data folder with every file the eval commands read, in the tiny tokenizer's words.

    Topics smaller than the asked topic + held-out sizes are halved by ``topics.split``; medical has
    the real 50 + 200 because ``eval topic-signal`` and ``eval generation`` check their sizes without halving.
    """
    topics = root / "topics"
    for seed, (name, words) in enumerate(TOPIC_WORDS.items()):
        texts = topic_sentences(words, n_medical if name == "medical_medquad" else n_topic_texts, seed)
        # sycophancy A/B items carry their sycophantic answer, which the reader appends
        _jsonl(topics / f"{name}.jsonl.gz", [{"text": t, **({"answer_matching_behavior": "(A) yes"} if i % 2 else {})}
                                             if name == "sycophancy_caa" else {"text": t} for i, t in enumerate(texts)])
    _jsonl(topics / "unaligned_awesome_prompts.jsonl.gz", [{"text": t} for t in make_texts(n_topic_texts, seed=23)])
    (topics / "medical_metaphors.txt").write_text("\n".join(PROMPTS) + "\n")
    labels = [*MEDICAL_SUBJECTS, "philosophy", "professional_law"]
    _jsonl(root / "reference" / "mmlu.jsonl.gz",
           [{"text": t, "label": labels[i % len(labels)]} for i, t in enumerate(make_texts(20, seed=40))])
    for seed, (split, n) in enumerate({"train": 60, "dev_in": 16, "dev_out": 16}.items()):
        _jsonl(root / "acceptability" / SPLITS[split], _cola_rows(n, seed))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("eval-cli-data"))


Run = Callable[..., Result]


@pytest.fixture
def tiny(tiny_lm: LoadedModel, sae: SAE, index: ReferenceIndex, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Run:
    """Runs ``saealign`` with the eval commands on the tiny model, SAE, index and the hashing embedder
    (the loader is passed as click's context object: nothing is loaded or patched)."""
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))
    return lambda *args: run(*args, obj=TinyLoader(tiny_lm, sae, index, SMALL_AUTO))


def run(*args: object, obj: object = None) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args], obj=obj)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def assert_one_error_line(result: Result, *needles: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def section_title(out: Path, name: str) -> str:
    return (out / name / f"{name}.md").read_text().splitlines()[0].removeprefix("# ")


# -- eval all --------------------------------------------------------------------------------------------
def test_eval_all_quick_writes_every_section_and_resumes(tmp_path: Path, data: Path, tiny: Run) -> None:
    out = tmp_path / "all"
    first = ok(tiny("eval", "all", "--quick", "--out", out, "--data", data, "--layers", 0))
    assert f"wrote {out / 'report.md'}" in first.output
    report = (out / "report.md").read_text()
    assert report.startswith("# saealign evaluation report (quick)")
    for name in SECTIONS:
        assert (out / name / f"{name}.json").exists(), name
        assert f"== {name}\n" in first.output
        assert f"\n## {section_title(out, name)}\n" in report, name
        assert f"| {name} | " in report  # its wall time
    pngs = {"coverage": "coverage.png", "topk": "topk.png", "layer": "layer.png", "generation": "generation.png",
            "frontier": "frontier_medical.png"}
    for name, png in pngs.items():
        assert f"![{png[:-4]}]({name}/{png})" in report
        assert (out / name / png).read_bytes()[:8] == PNG_MAGIC
    # sections in SECTIONS order, each section's own sub-headings demoted below its "##"
    positions = [report.index(f"## {section_title(out, name)}") for name in SECTIONS]
    assert positions == sorted(positions)
    assert "\n# " not in report.split("\n", 1)[1]

    # --quick: one seed, 16 tokens, the medical topic only, strengths 1 and 4 besides auto
    gen = json.loads((out / "generation" / "generation.json").read_text())
    assert gen["setup"]["seeds"] == [0] and gen["setup"]["max_new_tokens"] == 16
    frontier = json.loads((out / "frontier" / "frontier.json").read_text())
    assert [s["topic"] for s in frontier["summary"]] == ["medical"]
    assert [r["strength"] for r in frontier["rows"] if r["kind"] == "steer" and r["method"] == "swap"] == [
        1.0, 4.0, "auto", "auto"]
    # one acceptability classifier: the experiments reuse the one the acceptability section trained
    assert len(list((tmp_path / "cache" / "acceptability").iterdir())) == 1
    assert all(isinstance(r["acceptable"], float) for r in gen["rows"] + frontier["rows"])
    # one LoRA model per topic and process: cost reports the tuning that generation and frontier reused
    cost = {r["stage"]: r for r in json.loads((out / "cost" / "cost.json").read_text())["rows"]}
    assert cost["fine-tune (lora, 3 epochs)"]["seconds"] == gen["timings"]["fine-tune lora (medical)"]
    assert frontier["timings"]["fine-tune lora (medical)"] == gen["timings"]["fine-tune lora (medical)"]

    times = json.loads((out / "timings.json").read_text())
    again = ok(tiny("eval", "all", "--quick", "--out", out, "--data", data, "--layers", 0))
    for name in SECTIONS:
        assert f"== {name}: already done in {out / name} (--force reruns it)" in again.output
    assert json.loads((out / "timings.json").read_text()) == times
    assert (out / "report.md").read_text() == report

    before = (out / "ablation" / "ablation.json").stat().st_mtime_ns
    forced = ok(tiny("eval", "all", "--quick", "--out", out, "--data", data, "--layers", 0, "--only", "ablation",
                    "--force"))
    assert "== ablation\n" in forced.output and "already done" not in forced.output
    assert (out / "ablation" / "ablation.json").stat().st_mtime_ns > before
    assert json.loads((out / "timings.json").read_text())["ablation"] != times["ablation"]


def test_eval_all_keeps_what_finished_before_a_failure(tmp_path: Path, data: Path, tiny: Run,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import saealign.evaluate.cost as cost_module

    def broken(*args: object, **kwargs: object) -> None:
        raise SaealignError("the cost section broke")

    monkeypatch.setattr(cost_module, "measure_cost", broken)
    out = tmp_path / "all"
    result = tiny("eval", "all", "--quick", "--out", out, "--data", data, "--layers", 0, "--only", "ablation,cost")
    assert result.exit_code == 1 and result.output.rstrip().endswith("Error: the cost section broke")
    assert list(json.loads((out / "timings.json").read_text())) == ["ablation"]
    assert f"## {section_title(out, 'ablation')}" in (out / "report.md").read_text()
    assert not (out / "cost").exists()


# -- eval frontier ---------------------------------------------------------------------------------------
FRONTIER_LABELS = ["none", "L0 swap/error", "L0 swap/error x4", "L0 swap/error auto", "L0 clamp/replace",
                   "L0 swap/error auto gen-only", "prompting", "FT (lora)"]


def test_eval_frontier_rows_and_relative_figures(tmp_path: Path, data: Path, tiny: Run) -> None:
    """Three topics: two from the shared data (sycophancy with its A/B answers) and the packaged shoes."""
    out = tmp_path / "frontier"
    result = ok(tiny("eval", "frontier", "--layer", 0, "--topics", "medical,sycophancy,shoes", "--strengths", "1,4",
                    "--baselines", "prompt,lora", "--seeds", "0", "--n-topic", 8, "--n-heldout", 8,
                    "--max-new-tokens", 4, "--max-prompts", 1, "--data", data, "--out", out))
    saved = json.loads((out / "frontier.json").read_text())
    assert (out / "frontier.md").read_text() in result.output
    for topic in ("medical", "sycophancy", "shoes"):
        rows = [r for r in saved["rows"] if r["topic"] == topic]
        assert [r["label"] for r in rows] == FRONTIER_LABELS
        assert [r["kind"] for r in rows] == ["steer"] * 6 + ["prompt", "finetune"]
        none = rows[0]
        real = none["real_distance"]
        assert none["distance"] > real  # the topic texts are closer to each other than the LM's text: a gap to close
        assert none["gap_closed"] == 0.0 and none["ppl_ratio"] == 1.0
        for r in rows[1:]:
            if r["distance"] != none["distance"]:
                assert r["gap_closed"] == pytest.approx((none["distance"] - r["distance"]) / (none["distance"] - real))
            # null (standard JSON for NaN) where every continuation came out empty (shoes: English prompts are <unk>
            # to the tiny tokenizer)
            ppl, ratio = (math.nan if v is None else v for v in (r["ppl"], r["ppl_ratio"]))
            assert ratio == pytest.approx(ppl / none["ppl"], nan_ok=True)
        strengths = {r["label"]: r["strength_used"] for r in rows}
        assert strengths["L0 swap/error x4"] == 4.0 and strengths["L0 swap/error"] == 1.0
        assert strengths["none"] is strengths["prompting"] is strengths["FT (lora)"] is None
        auto = rows[3]
        (summary,) = [s for s in saved["summary"] if s["topic"] == topic]
        assert summary["auto_strength"] == auto["strength_used"]
        assert 0.0 <= auto["strength_used"] <= STRENGTH_RANGE["swap"][1]  # the search stays in the method's range
        assert summary["meets_target"] == (auto["gap_closed"] >= 0.5 and auto["ppl_ratio"] <= 1.15)
        assert (out / f"frontier_{topic}.png").read_bytes()[:8] == PNG_MAGIC
    assert [s["topic"] for s in saved["summary"]] == ["medical", "sycophancy", "shoes"]
    assert set(saved["timings"]) == {f"fine-tune lora ({t})" for t in ("medical", "sycophancy", "shoes")}


# -- eval generation -------------------------------------------------------------------------------------
def test_eval_generation_baselines_continue_the_original_prompts(
    tmp_path: Path, data: Path, tiny_lm: LoadedModel, sae: SAE, index: ReferenceIndex, tiny: Run
) -> None:
    from saealign.evaluate.metrics import continuation_nll, perplexity
    from saealign.evaluate.topics import TOPICS

    out = tmp_path / "gen"
    ok(tiny("eval", "generation", "--layers", 0, "--methods", "none,swap", "--modes", "error", "--seeds", "0",
           "--strengths", "1", "--baselines", "prompt,lora", "--n-topic", 8, "--n-heldout", 8,
           "--max-new-tokens", 3, "--data", data, "--out", out))
    saved = json.loads((out / "generation.json").read_text())
    rows = {r["label"]: r for r in saved["rows"]}
    assert list(rows) == ["none", "L0 swap/error", "prompting", "FT (lora)"]
    assert rows["FT (lora)"]["kind"] == "finetune" and "fine-tune lora (medical)" in saved["timings"]
    samples = saved["reference"]["samples"]
    assert set(samples) == {"L0 none error s1", "L0 swap error s1", "prompting", "FT (lora)"}
    assert [p for p, _ in samples["prompting"]] == [p for p, _ in samples["FT (lora)"]] == PROMPTS
    # the prompting row's texts are what the model writes behind the instruction...
    instruction = TOPICS["medical"].instruction
    behind = Aligner(tiny_lm, sae, 0, index, HashingEmbedder()).generate(
        [instruction + p for p in PROMPTS], spec=GenerationSpec("none", max_new_tokens=3, top_k=5), seed=0)
    texts = [t for _, t in samples["prompting"]]
    assert texts == [g.text for g in behind]
    # ...and the judge scores them as continuations of the original prompts, not of the instruction
    assert rows["prompting"]["ppl"] == pytest.approx(perplexity(continuation_nll(tiny_lm, PROMPTS, texts)))
    assert rows["prompting"]["changed"] == rows["FT (lora)"]["changed"] == 0.0
    assert 0 < rows["prompting"]["contamination"] <= 1  # read through the SAE like every other row


# -- eval cost -------------------------------------------------------------------------------------------
def test_eval_cost_rows(tmp_path: Path, data: Path, index: ReferenceIndex, tiny: Run) -> None:
    ok(tiny("eval", "cost", "--layer", 0, "--n-topic", 8, "--data", data, "--out", tmp_path / "cost"))
    rows = json.loads((tmp_path / "cost" / "cost.json").read_text())["rows"]
    stages = [r["stage"] for r in rows]
    assert stages == ["load model (converted copy in the user cache)", f"build reference index ({N_CORPUS} prompts)",
                      "score a topic (8 texts)", "automatic strength search",
                      *[f"{m} generation, batch {len(PROMPTS)}" for m in ("plain", "plain", "Swap", "Swap")],
                      "fine-tune (lora, 3 epochs)", "fine-tune (full, 3 epochs)"]
    by = {(r["stage"], r["unit"]): r for r in rows}
    build = rows[1]
    assert build["seconds"] == pytest.approx(sum(index.manifest["timings"].values()))
    assert set(index.manifest["timings"]) <= set(build["note"].replace(",", "").split())
    assert rows[3]["note"].startswith("strength auto -> ")
    plain = by[(f"plain generation, batch {len(PROMPTS)}", "per token slot")]["seconds"]
    swap = by[(f"Swap generation, batch {len(PROMPTS)}", "per token slot")]
    assert swap["note"] == f"steered / plain = {swap['seconds'] / plain:.3f}x"
    per_prompt = by[(f"plain generation, batch {len(PROMPTS)}", "per prompt")]
    slots = int(re.fullmatch(r"up to 64 new tokens, (\d+) token slots in [\d.]+ s", per_prompt["note"])[1])  # type: ignore[index]
    assert slots % len(PROMPTS) == 0 and len(PROMPTS) <= slots <= 64 * len(PROMPTS)
    assert per_prompt["seconds"] * len(PROMPTS) == pytest.approx(plain * slots)
    assert all(r["seconds"] > 0 for r in rows[2:])
    assert [r["unit"] for r in rows[-2:]] == ["per topic"] * 2 and "tokens, final loss" in rows[-1]["note"]
    ok(tiny("eval", "cost", "--layer", 0, "--n-topic", 8, "--no-finetune", "--data", data, "--out", tmp_path / "c2"))
    assert not [r for r in json.loads((tmp_path / "c2" / "cost.json").read_text())["rows"] if "fine-tune" in r["stage"]]


# -- bad input -------------------------------------------------------------------------------------------
def refuse(*args: object) -> Result:
    """Bad input must fail before any model loads: the loader fails the test on any load (uncaught, not one line)."""
    return run(*args, obj=RefusingLoader())


def test_bad_input_is_one_error_line(tmp_path: Path, data: Path) -> None:
    frontier = ("eval", "frontier", "--layer", 0, "--data", data, "--out", tmp_path / "f")
    assert_one_error_line(refuse(*frontier, "--topics", "medical,cooking"), "unknown topic cooking", "sycophancy")
    assert_one_error_line(refuse(*frontier, "--topics", ","), "unknown topic (none)")
    assert_one_error_line(refuse(*frontier, "--strengths", "1,big"), "--strengths", "'big'")
    assert_one_error_line(refuse(*frontier, "--strengths", "1,-2"), "--strengths", "'-2'")
    assert_one_error_line(refuse(*frontier, "--strengths", "1,auto"), "auto is always included")
    assert_one_error_line(refuse(*frontier, "--baselines", "prompt,rlhf"), "unknown baseline rlhf")
    assert_one_error_line(refuse("eval", "generation", "--data", data, "--strengths", "1,big"), "--strengths", "'big'")
    assert_one_error_line(refuse("eval", "all", "--data", data, "--only", "coverage,bogus", "--out", tmp_path / "a"),
                          "unknown section bogus", "coverage")
    assert_one_error_line(refuse("eval", "all", "--data", tmp_path / "missing", "--out", tmp_path / "a"), "--data")
    no_cola = tmp_path / "no_cola"
    (no_cola / "topics").mkdir(parents=True)
    assert_one_error_line(refuse("eval", "train-acceptability", "--data", no_cola, "--out", tmp_path / "t"),
                          "no CoLA folder", "acceptability")
    few = write_data(tmp_path / "few", n_topic_texts=5)
    assert_one_error_line(refuse(*frontier[:-4], "--data", few, "--topics", "amazon", "--out", tmp_path / "f"),
                          "has 5 texts", "at least 8")
    assert_one_error_line(refuse("eval", "topk", "--layers", 0, "--topic", "sycophancy", "--data", few, "--out",
                              tmp_path / "k"), "has 5 texts")
    broken = write_data(tmp_path / "broken")
    _jsonl(broken / "topics" / "amazon_reviews.jsonl.gz", [{"text": "a house"}, {"body": "no text"}])
    assert_one_error_line(refuse(*frontier[:-4], "--data", broken, "--topics", "amazon", "--out", tmp_path / "f"),
                          "amazon_reviews.jsonl.gz line 2", "`text`")


def test_cli_modules_import_in_any_order() -> None:
    """Every command module imports alone (no registration by import: ``app`` puts them together)."""
    import subprocess
    import sys

    for module in ("saealign.cli.evaluate", "saealign.cli.eval_paper", "saealign.cli.align", "saealign.cli.prepare",
                   "saealign.cli.app"):
        code = f"import {module}; from saealign.cli.app import main; assert {{'all', 'frontier', 'cost'}} <= set(main.commands['eval'].commands)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, f"import {module} first:\n{done.stderr[-800:]}"


# -- the evaluation topics -------------------------------------------------------------------------------
def test_topic_texts_and_split(data: Path) -> None:
    from saealign.evaluate.topics import split, topic_texts

    syco = topic_texts(data, "sycophancy")
    plain = topic_sentences(TOPIC_WORDS["sycophancy_caa"], 24, 2)
    assert syco == [t + ("\nAnswer: (A) yes" if i % 2 else "") for i, t in enumerate(plain)]
    topic, held = split(syco, 50, 200)  # too few for 50 + 200: halves
    assert (len(topic), len(held)) == (12, 12) and not set(topic) & set(held)
    assert split(syco, 5, 3) == split(syco, 5, 3) and [len(p) for p in split(syco, 5, 3)] == [5, 3]  # seeded
    with pytest.raises(SaealignError, match="has 7 texts; at least 8"):
        split(syco[:7], 2, 2 + 4)
    assert [len(p) for p in split(syco[:7], 2, 3)] == [2, 3]  # 7 texts are enough for 2 + 3: no error


def test_split_topic_part_is_independent_of_the_heldout_size() -> None:
    """eval all's experiments ask for different held-out sizes but must score (and fine-tune on) one topic part.

    400 texts: ``random.sample`` switches algorithm with the sample size here, so one draw of topic +
    held-out texts would give different topic parts.
    """
    from saealign.evaluate.topics import split

    texts = [f"text {i}" for i in range(400)]
    topic = split(texts, 50, 200)[0]
    assert split(texts, 50, 40)[0] == split(texts, 50, 10)[0] == topic
    assert split(texts, 50, 0)[0] == topic  # eval topic-signal's topic too
