"""The steering benchmark on tiny models: its table, its exact identities, its CLI and its bad input."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

import saealign.cli.app as cli
from conftest import TinyLoader, build_tiny_index, make_sae, make_texts
from saealign.cli.common import parse_seeds
from saealign.evaluate.bench_topics import BenchTopic, load_bench_topics
from saealign.evaluate.metrics import distinct_n
from saealign.evaluate.steer_bench import (
    EXAMPLES_IN_PROMPT,
    INSTRUCTION,
    PREVIOUS_DEFAULT,
    BenchCondition,
    BenchConfig,
    bench_openers,
    condition_name,
    default_conditions,
    run_steer_bench,
    shared_by_topics,
)
from saealign.evaluate.steer_bench_table import MAIN_ROWS, main_conditions, named_conditions
from saealign.evaluate.topic_classifier import TopicClassifier
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.sae.autoencoder import SAE
from saealign.steering.aligner import Aligner
from saealign.steering.spec import GenerationSpec as Spec
from saealign.steering.strength import AutoStrengthConfig

DOMAINS = {  # CLINC150 domains of the benchmark, in the tiny tokenizer's words
    "banking": ("sun", "moon", "star", "sky", "light", "shines"),
    "travel": ("water", "river", "rain", "snow", "cold", "falls"),
    "kitchen_and_dining": ("house", "tree", "green", "big", "old", "grows"),
    "auto_and_commute": ("cat", "dog", "bird", "fish", "runs", "swims"),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_clinc(root: Path, per_topic: int = 80) -> Path:
    rng = random.Random(0)
    rows = []
    for domain, words in DOMAINS.items():
        seen: set[str] = set()
        while len(seen) < per_topic:
            seen.add(" ".join(rng.choice(words) for _ in range(rng.randint(5, 10))))
        rows += [{"text": t, "label": f"{domain}/intent"} for t in sorted(seen)]
    path = root / "reference" / "clinc150.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(scope="module")
def index(tiny_lm: LoadedModel, sae: SAE, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    texts = make_texts(48, seed=5, min_words=6, max_words=14)
    return build_tiny_index(tiny_lm, sae, tmp_path_factory.mktemp("bench-index"), texts, ["x"] * 48, shard_size=16)


@pytest.fixture(scope="module")
def topics(tmp_path_factory: pytest.TempPathFactory) -> list[BenchTopic]:
    return load_bench_topics(write_clinc(tmp_path_factory.mktemp("data")), 30, 40, groups=("clinc",))


def test_topics_are_disjoint_seeded_splits(topics: list[BenchTopic]) -> None:
    assert [t.name for t in topics] == ["banking", "travel", "cooking", "cars"]
    for t in topics:
        assert len(t.align) == 30 and len(t.heldout) == 40 and not set(t.align) & set(t.heldout)


def test_bench_identities_on_a_tiny_stack(tiny_lm: LoadedModel, sae: SAE, index, topics: list[BenchTopic],  # noqa: ANN001
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path))
    aligner = Aligner(tiny_lm, sae, 0, index, HashingEmbedder())
    classifier = TopicClassifier(tiny_lm, topics)  # a model as the feature source (the default is the embedder)
    assert set(classifier.groups) == {"clinc"} and 0 <= classifier.groups["clinc"].accuracy <= 1
    conditions = [BenchCondition("none", Spec("none")), BenchCondition("add 0", Spec("add", strength=0, temperature=1)),
                  BenchCondition("prompting", Spec("none"), prompting=True),
                  BenchCondition("add 1", Spec("add", strength=1)), BenchCondition("shots", Spec("none"), examples=2)]
    cfg = BenchConfig(n_openers=3, seeds=(0, 1), max_new_tokens=6, batch=7)
    unsteered_rows: list[str] = []
    generate = aligner.generate

    def counting(prompts, topic=None, spec=None, **kw):  # noqa: ANN001, ANN003, ANN202
        if spec is not None and spec.method == "none":
            unsteered_rows.extend(prompts)
        return generate(prompts, topic, spec, **kw)

    monkeypatch.setattr(aligner, "generate", counting)
    result = run_steer_bench(aligner, tiny_lm, topics, conditions, cfg, classifier, log=lambda _: None)
    # the unsteered row is the same for every topic: generated once (3 openers x 2 seeds), prompting once per topic
    # (the aligner's own unsteered text, for the activation contrast, is generated from other prompts)
    openers = bench_openers(3)
    assert len([p for p in unsteered_rows if p in openers]) == 6
    assert len([p for p in unsteered_rows if p.startswith("The following") and p.split("\n\n")[-1] in openers]) == 6 * len(topics)
    rows = {r["condition"]: r for r in result["rows"]}
    assert list(rows) == ["none", "add 0", "prompting", "add 1", "shots"]
    # the few-shot row: each topic's first two alignment texts before every opener, once per topic
    for t in topics:
        assert len([p for p in unsteered_rows if p.startswith(f"{t.align[0]}\n\n{t.align[1]}\n\n")]) == 6
    assert rows["none"]["ppl_ratio"] == 1.0 and rows["none"]["distinct2_ratio"] == 1.0
    # strength 0 adds nothing: the very same texts, hence the same hit rate and perplexity
    none_cells = [c for c in result["cells"] if c["condition"] == "none"]
    assert len(none_cells) == len(topics) and all(c["nll_per_text"] == none_cells[0]["nll_per_text"] for c in none_cells)
    zero_cells = [c for c in result["cells"] if c["condition"] == "add 0"]
    assert [c["samples"] for c in zero_cells] == [c["samples"] for c in none_cells]
    assert rows["add 0"]["hit_rate"] == rows["none"]["hit_rate"] and rows["add 0"]["ppl_ratio"] == pytest.approx(1.0)
    for c in result["cells"]:
        assert 0 <= c["hit_rate"] <= 1 and len(c["hit_rate_per_seed"]) == 2 and c["tokens"] > 0
    assert rows["add 1"]["strength"] == 1.0
    for row in rows.values():  # every cell kept its per-continuation NLLs: each row has its ratio's interval
        assert 0 < row["ppl_ratio_low"] <= row["ppl_ratio_high"]
    for c in result["cells"]:
        assert len(c["nll_per_text"]) == len(c["tokens_per_text"]) == 6 and sum(c["tokens_per_text"]) == c["tokens"]
        assert sum(c["nll_per_text"]) == pytest.approx(c["nll"])


def test_cli_quick_writes_tables_and_the_frontier(tiny_lm: LoadedModel, sae: SAE, index, tmp_path: Path,  # noqa: ANN001
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))
    data, out = write_clinc(tmp_path / "data"), tmp_path / "out"
    loader = TinyLoader(tiny_lm, sae, index, AutoStrengthConfig(n_prompts=2, max_new_tokens=4))
    result = CliRunner().invoke(cli.main, ["eval", "steer-bench", "--quick", "--layer", "0", "--data", str(data),
                                           "--out", str(out)], obj=loader)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    saved = json.loads((out / "steer_bench.json").read_text())
    labels = [r["condition"] for r in saved["summary"]]
    assert labels[:3] == ["none", "prompting", "prompting + default"] and labels[-1].startswith("default")
    assert [r["topic"] for r in saved["rows"]] == ["banking", "travel", "cooking", "cars"]
    assert (out / "steer_bench_frontier.png").read_bytes()[:8] == PNG_MAGIC
    assert "| condition | hit_rate | ppl_ratio | ppl_ratio_95ci |" in (out / "steer_bench.md").read_text()
    assert all(r["ppl_ratio_low"] <= r["ppl_ratio_high"] for r in saved["summary"])


def test_cli_main_rows_run_the_four_rows_the_targets_read(tiny_lm: LoadedModel, sae: SAE, index,  # noqa: ANN001
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))
    data, out = write_clinc(tmp_path / "data", per_topic=180), tmp_path / "out"
    loader = TinyLoader(tiny_lm, sae, index, AutoStrengthConfig(n_prompts=2, max_new_tokens=4))
    result = CliRunner().invoke(cli.main, ["eval", "steer-bench", "--rows", "main", "--groups", "clinc", "--openers", "2",
                                           "--seeds", "3", "--unsteered-seeds", "3,4,5", "--max-new-tokens", "4",
                                           "--layer", "0", "--data", str(data), "--out", str(out)], obj=loader)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    saved = json.loads((out / "steer_bench.json").read_text())
    assert [r["condition"] for r in saved["summary"]] == [c.label for c in main_conditions()]
    # the unsteered row on its own three seeds (2 openers each), the steered rows on --seeds alone
    for c in saved["cells"]:
        n = 6 if c["condition"] == "none" else 2
        assert len(c["hit_rate_per_seed"]) == n // 2 and len(c["nll_per_text"]) == n
    assert saved["config"]["unsteered_seeds"] == [3, 4, 5] and "the unsteered row: 3 seeds" in (out / "steer_bench.md").read_text()
    assert all(r["ppl_ratio_low"] <= r["ppl_ratio_high"] for r in saved["summary"])
    assert [c.label for c in main_conditions()][:3] == ["none", "prompting", "prompting + default"]
    assert main_conditions()[3].spec == Spec() and not main_conditions()[3].prompting  # the default itself
    assert saved["config"]["seeds"] == [3] and saved["config"]["n_openers"] == 2


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, needle in ((["--groups", "wordnet"], "unknown --groups"), (["--openers", "40"], "--openers"),
                         (["--rows", "none,nonsense"], "no benchmark row is called 'nonsense'"),
                         (["--rows", " , "], "--rows is empty"),
                         (["--unsteered-seeds", "1,x"], "--unsteered-seeds takes non-negative integers"),
                         (["--seeds", "5-3"], "--seeds takes non-negative integers or ranges"),
                         (["--seeds", "-1"], "--seeds takes"), (["--seeds", "0,2,1-3"], "names a seed twice")):
        result = CliRunner().invoke(cli.main, ["eval", "steer-bench", *args, "--data", str(tmp_path)])
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
        lines = [x for x in result.output.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0], result.output
    with pytest.raises(Exception, match="not found"):
        load_bench_topics(tmp_path, groups=("clinc",))


def test_default_rows_compare_the_boosted_default_with_the_constant_push() -> None:
    default = Spec()  # add 0.05, prompt x4, slot 1, temperature 1.2
    rows = {c.label: c for c in default_conditions(default)}
    assert len(rows) == len(default_conditions(default))  # labels are unique
    assert rows["default (add 0.05 prompt x4 slot 1 T1.2)"].spec == default and rows["prompting + default"].prompting
    assert rows["prompting + default"].spec == default and rows["prompting"].spec == Spec("none")
    assert rows["add 0.075 prompt x4 slot 1 T1.2"].spec == Spec(strength=0.075)
    assert rows["add 0.025 prompt x4 slot 1 T1.2"].spec == Spec(strength=0.025)
    # the constant push at the default's prompt push (0.05 x 4), and the default sampled at temperature 1
    assert rows["add 0.2 slot 1 T1.2 constant push"].spec == Spec(strength=0.2, prompt_boost=1)
    assert rows["add 0.05 prompt x4 slot 1"].spec == Spec(temperature=1.0)
    assert rows["add auto prompt x4 slot 1 T1.2"].spec.is_auto and rows["add auto prompt x4 slot 1 T1.2"].spec.boost == 4
    # the feedback's own strength and boost, the default's slot and temperature
    assert rows["add 0.35 slot 1 T1.2 with feedback"].spec == Spec(feedback=True)
    assert rows["add 0.05 prompt x4 slot 1 T1.2 without output match"].spec == Spec(output_match=False)
    assert not any("output match" in c.label for c in default_conditions(Spec(output_match=False)))
    assert [c.label for c in default_conditions(Spec("add", strength=0.25, prompt_boost=1, temperature=1))][3:9] == [
        "default (add 0.25 slot 1)", "examples in prompt", "examples in prompt + default", "add 0.225 slot 1",
        "add 0.275 slot 1", "add 0.25"]  # the default's push without the slot (then its template alone)
    assert not any("constant push" in c.label or c.spec.heat != 1  # nothing to compare a constant push at 1 with
                   for c in default_conditions(Spec(prompt_boost=1, temperature=1)) if c.spec.method == "add"
                   and not c.spec.feedback)
    assert rows["add 0.05 prompt x4 one layer slot 1 T1.2"].spec == Spec(companion_push=0)
    assert len(default_conditions(Spec(companion_push=0))) == len(default_conditions()) - 1  # no second one-layer row
    assert {c.label for c in default_conditions(Spec(companion_push=2))} >= {
        "default (add 0.05 prompt x4 companion x2 slot 1 T1.2)", "add 0.05 prompt x4 one layer slot 1 T1.2"}
    # the tuned mix's row: the default's push along the tuned mix; a tuned default gets none
    assert rows["add 0.05 prompt x4 tuned 12 slot 1 T1.2"].spec == Spec(tune_steps=12)
    assert not any("tuned 12" in c.label for c in default_conditions(Spec(tune_steps=3)))
    assert default_conditions(Spec(tune_steps=3))[3].label == "default (add 0.05 prompt x4 tuned 3 slot 1 T1.2)"
    # a temperature shows in every row built from it; greedy decoding reads none
    hotter = {c.label: c for c in default_conditions(Spec(strength=0.1, prompt_boost=1.5, slot_push=0.5))}
    assert hotter["default (add 0.1 prompt x1.5 slot 0.5 T1.2)"].spec.temperature == 1.2
    assert "add 0.125 prompt x1.5 slot 0.5 T1.2" in hotter
    assert condition_name(Spec(greedy=True)) == "add 0.05 prompt x4 slot 1"
    # the previous default, a row of its own (once: a run whose default it is has no second one)
    assert rows["previous default (add 0.15 slot 0.5)"].spec == PREVIOUS_DEFAULT == Spec(
        strength=0.15, prompt_boost=1, slot_push=0.5, temperature=1)
    assert not any(c.label.startswith("previous") for c in default_conditions(PREVIOUS_DEFAULT))
    assert [c.label for c in named_conditions(["previous default"])] == ["previous default (add 0.15 slot 0.5)"]
    assert condition_name(Spec("none", temperature=0.8)) == "none 1 T0.8"


def test_named_rows_come_in_the_benchmarks_order() -> None:
    picked = named_conditions(["diffmean 0.05 prompt x4 slot 1 T1.2", "default", "none"])
    assert [c.label for c in picked] == ["none", "default (add 0.05 prompt x4 slot 1 T1.2)",
                                         "diffmean 0.05 prompt x4 slot 1 T1.2"]
    assert picked[1].spec == Spec() and picked[2].spec == Spec("diffmean")  # the same push, slot and temperature
    assert named_conditions(list(MAIN_ROWS)) == main_conditions()


def test_the_few_shot_peer_puts_the_first_alignment_texts_before_the_opener(topics: list[BenchTopic]) -> None:
    rows = {c.label: c for c in default_conditions()}
    shots, both = rows["examples in prompt"], rows["examples in prompt + default"]
    assert shots.spec == Spec("none") and both.spec == Spec() and shots.examples == both.examples == EXAMPLES_IN_PROMPT
    banking = topics[0]
    assert shots.prefix(banking) == "\n\n".join(banking.align[:EXAMPLES_IN_PROMPT]) + "\n\n"
    assert rows["prompting"].prefix(banking) == INSTRUCTION.format(title=banking.title) and rows["none"].prefix(banking) == ""
    assert not shared_by_topics(shots) and shared_by_topics(rows["none"]) and not shared_by_topics(rows["prompting"])


def test_seeds_take_ranges() -> None:
    assert parse_seeds("0,1,2") == (0, 1, 2) and parse_seeds("24-27") == (24, 25, 26, 27)
    assert parse_seeds("0, 3,8-10") == (0, 3, 8, 9, 10) and parse_seeds("5-5") == (5,)


def test_distinct2_of_a_bigger_unsteered_sample_is_read_at_the_steered_rows_size() -> None:
    from saealign.evaluate.steer_bench import _distinct2

    texts = ["a b", "c d", "a b", "c d"]  # each half is all distinct; the whole repeats every bigram once
    assert _distinct2(texts, 2) == 1.0 and distinct_n(texts, 2) == 0.5
    assert _distinct2(texts, 4) == 0.5 and _distinct2(texts, 3) == 0.5  # under two whole samples: read whole
    assert _distinct2([*texts, "e f"], 2) == 1.0  # the remainder past whole samples is left out
