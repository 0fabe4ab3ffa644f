"""Corpus reading (every format, WordNet's real data.* layout), cleaning, sampling and topic files."""

from __future__ import annotations

import csv
import gzip
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from saealign.errors import SaealignError
from saealign.reference.corpus import Corpus, CorpusOptions, clean, sample, truncate_tokens
from saealign.reference.corpus_spec import read_corpus
from saealign.reference.text_files import read_topic
from saealign.reference.wordnet import LEXNAMES, parse_wordnet_line, read_wordnet

# Real lines of WordNet 3.0 (Debian wordnet-base, /usr/share/wordnet), licence header included.
WORDNET = {
    "noun": [
        "  1 This software and database is being provided to you, the LICENSEE, by  ",
        "  2 Princeton University under the following license.  By obtaining, using  ",
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is "
        "perceived or known or inferred to have its own distinct existence (living or nonliving)  ",
        "00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 + 00692347 v 0101 ~ 00023100 n "
        "0000 ~ 00024264 n 0000 ~ 00031264 n 0000 ~ 00031921 n 0000 ~ 00033020 n 0000 ~ 00033615 n 0000 ~ "
        "05854150 n 0000 ~ 07888465 n 0000 | a general concept formed by extracting common features from "
        "specific examples  ",
        "07170753 10 n 01 carrot 1 002 @ 07161429 n 0000 ;c 01161087 n 0000 | promise of reward as in \"carrot "
        "and stick\"; \"used the carrot of subsidized housing for the workers to get their vote\"  ",
    ],
    "verb": [
        "  1 This software and database is being provided to you, the LICENSEE, by  ",
        "00002325 29 v 01 respire 1 005 $ 00001740 v 0000 @ 02108395 v 0000 + 03110323 a 0101 + 00831191 n "
        "0103 + 00830811 n 0101 01 + 02 00 | undergo the biomedical and metabolic processes of respiration by "
        "taking up oxygen and producing carbon monoxide  ",
    ],
    "adj": [
        "00002098 00 a 01 unable 0 002 = 05200169 n 0000 ! 00001740 a 0101 | (usually followed by `to') not "
        'having the necessary means or skill or know-how; "unable to get to town without a car"; "unable to '
        'obtain funds"  ',
        "00020103 00 s 02 outback(a) 0 remote 0 001 & 00019731 a 0000 | inaccessible and sparsely populated  ",
    ],
    "adv": [
        "00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; \"they performed a cappella\"  ",
    ],
}

WORDNET_TEXTS = [
    ("entity: that which is perceived or known or inferred to have its own distinct existence (living or "
     "nonliving)", "noun.Tops"),
    ("abstraction: a general concept formed by extracting common features from specific examples", "noun.Tops"),
    ('carrot: promise of reward as in "carrot and stick"', "noun.communication"),
    ("used the carrot of subsidized housing for the workers to get their vote", "noun.communication"),
    ("respire: undergo the biomedical and metabolic processes of respiration by taking up oxygen and producing "
     "carbon monoxide", "verb.body"),
    ("unable: (usually followed by `to') not having the necessary means or skill or know-how", "adj.all"),
    ("unable to get to town without a car", "adj.all"),
    ("unable to obtain funds", "adj.all"),
    ("outback: inaccessible and sparsely populated", "adj.all"),
    ("a cappella: without musical accompaniment", "adv.all"),
    ("they performed a cappella", "adv.all"),
]  # fmt: skip


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return write(path, gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def wordnet_dir(tmp_path: Path) -> Path:
    for pos, lines in WORDNET.items():
        write(tmp_path / "dict" / f"data.{pos}", "\n".join(lines) + "\n")
    return tmp_path / "dict"


def test_lexnames_are_the_45_wordnet_files() -> None:
    assert len(LEXNAMES) == 45 and len(set(LEXNAMES)) == 45
    assert (LEXNAMES[0], LEXNAMES[3], LEXNAMES[8], LEXNAMES[29], LEXNAMES[44]) == (
        "adj.all", "noun.Tops", "noun.body", "verb.body", "adj.ppl"
    )  # fmt: skip


def test_wordnet_real_format(wordnet_dir: Path) -> None:
    corpus = read_corpus(f"wordnet:{wordnet_dir}")
    assert list(zip(corpus.texts, corpus.labels, strict=True)) == WORDNET_TEXTS
    assert set(corpus.sources) == {"wordnet"}
    bare = read_wordnet(wordnet_dir, include_examples=False)
    assert bare.texts == [t for t, _ in WORDNET_TEXTS if ":" in t]


def test_wordnet_colon_example_and_header() -> None:
    line = (
        "02393580 04 n 01 substitution 0 001 @ 00001234 n 0000 | the act of putting one thing in the place of "
        'another: "he sent Smith in for Jones"  '
    )
    assert parse_wordnet_line(line) == (
        "substitution", "noun.act", "the act of putting one thing in the place of another", ["he sent Smith in for Jones"]
    )  # fmt: skip
    assert parse_wordnet_line("  29 Princeton University and LICENSEE agrees to preserve same.  ") is None
    with pytest.raises(SaealignError, match="not a WordNet data line"):
        parse_wordnet_line("hello world | gloss")


def test_wordnet_missing(tmp_path: Path) -> None:
    with pytest.raises(SaealignError, match="apt-get install wordnet-base"):
        read_corpus(f"wordnet:{tmp_path}")


def test_txt_labels_by_stem_and_cleaning(tmp_path: Path) -> None:
    write(tmp_path / "cooking.txt", "  boil the pasta \n\n   \nboil the pasta\r\nfry an egg\n")
    corpus = read_corpus(str(tmp_path / "cooking.txt"))
    assert corpus.texts == ["boil the pasta", "fry an egg"]
    assert corpus.labels == corpus.sources == ["cooking", "cooking"]
    raw = read_corpus(str(tmp_path / "cooking.txt"), options=CorpusOptions(strip=False, dedupe=False))
    assert raw.texts == ["  boil the pasta ", "boil the pasta", "fry an egg"]


def test_max_chars_then_dedupe() -> None:
    corpus = Corpus(["abcdef", "abc  xyz", "abcdzz"], ["a", "b", "c"], ["s"] * 3)
    out = clean(corpus, CorpusOptions(max_chars=4))
    assert out.texts == ["abcd", "abc"] and out.labels == ["a", "b"]
    with pytest.raises(SaealignError, match="max_chars"):
        CorpusOptions(max_chars=0)


def test_jsonl_fields_examples_and_gzip(tmp_path: Path) -> None:
    rows = [
        {"text": "heart attack", "label": "medical", "source": "medquad", "examples": ["chest pain", 3]},
        {"text": "goal scored"},
        {"body": "ignored field", "text": "tax return", "label": 7},
    ]
    for name in ("wn.jsonl", "wn.jsonl.gz"):
        corpus = read_corpus(str(write_jsonl(tmp_path / name, rows)))
        assert corpus.texts == ["heart attack", "chest pain", "goal scored", "tax return"]
        assert corpus.labels == ["medical", "medical", "wn", "7"]
        assert corpus.sources == ["medquad", "medquad", "wn", "wn"]
    plain = read_corpus(str(tmp_path / "wn.jsonl"), include_examples=False)
    assert plain.texts == ["heart attack", "goal scored", "tax return"]
    write_jsonl(tmp_path / "q.jsonl", [{"q": "why?", "kind": "DESC:reason"}, {"q": "who?", "kind": "HUM:ind"}])
    other = read_corpus(str(tmp_path / "q.jsonl"), text_field="q", label_field="kind")
    assert (other.texts, other.labels) == (["why?", "who?"], ["DESC:reason", "HUM:ind"])


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", '{"text": "ok"}\n\n{"text": "fine"}\n{bad json\n')
    with pytest.raises(SaealignError, match=r"a\.jsonl line 4 is not valid JSON"):
        read_corpus(str(tmp_path / "a.jsonl"))
    write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"question": "what?"}\n')
    with pytest.raises(SaealignError, match=r"b\.jsonl line 2 has no 'text' field \(fields: question\)"):
        read_corpus(str(tmp_path / "b.jsonl"))


def test_csv_with_named_fields(tmp_path: Path) -> None:
    with open(tmp_path / "q.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "topic"])
        w.writerows([["what is a cell, really?", "biology"], ['say "hi"', "greeting"]])
    corpus = read_corpus(str(tmp_path / "q.csv"), text_field="question", label_field="topic")
    assert corpus.texts == ["what is a cell, really?", 'say "hi"']
    assert corpus.labels == ["biology", "greeting"] and corpus.sources == ["q", "q"]
    with pytest.raises(SaealignError, match=r"q\.csv row 2 has no 'text' field \(fields: question, topic\)"):
        read_corpus(str(tmp_path / "q.csv"))


def test_parquet_and_missing_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a cat", "a dog"], "label": ["pets", None]}), tmp_path / "p.parquet")
    corpus = read_corpus(str(tmp_path / "p.parquet"))
    assert corpus.texts == ["a cat", "a dog"] and corpus.labels == ["pets", "p"]
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(SaealignError, match=r"install 'saealign\[data\]'"):
        read_corpus(str(tmp_path / "p.parquet"))


def test_folder_recursive_sorted_and_concatenation(tmp_path: Path) -> None:
    write(tmp_path / "data" / "z_sport.txt", "goal\n")
    write(tmp_path / "data" / "sub" / "b_food.txt", "pasta\n")
    write_jsonl(tmp_path / "data" / "a_law.jsonl.gz", [{"text": "contract"}])
    write(tmp_path / "data" / "notes.md", "not a corpus file\n")
    folder = read_corpus(str(tmp_path / "data"))
    # sorted by full path: a_law.jsonl.gz < sub/b_food.txt < z_sport.txt
    assert folder.texts == ["contract", "pasta", "goal"]
    assert folder.labels == ["a_law", "b_food", "z_sport"]
    write(tmp_path / "more.txt", "goal\nrain\n")
    both = read_corpus(f"{tmp_path / 'data'}, {tmp_path / 'more.txt'}")
    assert both.texts == ["contract", "pasta", "goal", "rain"]  # the second "goal" is a duplicate
    assert both.labels[-1] == "more"
    with pytest.raises(SaealignError, match="not found"):
        read_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(SaealignError, match="not a corpus file"):
        read_corpus(str(tmp_path / "data" / "notes.md"))


def test_fingerprint_and_subset() -> None:
    a = Corpus(["x", "y", "z"], ["p", "q", "p"], ["s1", "s1", "s2"], "one")
    b = Corpus(["x", "y", "z"], ["p", "q", "p"], ["other"] * 3, "two")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    assert a.fingerprint() != Corpus(["x", "y", "z"], ["p", "q", "q"], ["s"] * 3).fingerprint()
    assert a.fingerprint() != Corpus(["xy", "", "z"], ["p", "q", "p"], ["s"] * 3).fingerprint()
    sub = a.subset([2, 0])
    assert (sub.texts, sub.labels, sub.sources, sub.name, len(sub)) == (["z", "x"], ["p", "p"], ["s2", "s1"], "one", 2)
    with pytest.raises(SaealignError, match="2 texts, 1 labels"):
        Corpus(["a", "b"], ["l"], ["s", "s"])


def _corpus(counts: dict[str, int]) -> Corpus:
    labels = [lab for lab, n in counts.items() for _ in range(n)]
    return Corpus([f"text {i}" for i in range(len(labels))], labels, ["s"] * len(labels))


def test_sample_proportional_and_every_label() -> None:
    corpus = _corpus({"a": 6, "b": 3, "c": 1})
    # quotas 3, 1.5, 0.5 -> floors 3, 1, 0 -> c lifted to 1 -> exactly 5
    picked = sample(corpus, 5, seed=1)
    assert Counter(picked.labels) == {"a": 3, "b": 1, "c": 1}
    assert picked.texts == sample(corpus, 5, seed=1).texts  # deterministic
    indices = [int(t.split()[1]) for t in picked.texts]
    assert indices == sorted(indices)  # corpus order kept
    # quotas 3.88, 0.04 x 3 -> 3,1,1,1 overshoots by 2: taken back from "a"
    assert Counter(sample(_corpus({"a": 97, "b": 1, "c": 1, "d": 1}), 4, seed=0).labels) == dict.fromkeys("abcd", 1)
    # quotas 5.5, 5.5, 1 -> floors 5, 5, 1 -> one more to a or b
    counts = Counter(sample(_corpus({"a": 11, "b": 11, "c": 2}), 12, seed=3).labels)
    assert counts["c"] == 1 and sorted([counts["a"], counts["b"]]) == [5, 6]


def test_sample_sizes() -> None:
    corpus = _corpus(dict.fromkeys("abcde", 4))
    few = sample(corpus, 3, seed=0)
    assert len(few) == 3 and len(set(few.labels)) == 3  # fewer than the labels: at most one each
    flat = sample(corpus, 7, seed=0, stratify=False)
    assert len(flat) == 7 and len(set(flat.texts)) == 7
    assert sample(corpus, 50, seed=0).texts == corpus.texts
    assert len(sample(corpus, 0)) == 0
    with pytest.raises(SaealignError, match="negative"):
        sample(corpus, -1)


def test_truncate_tokens_keeps_exact_prefix() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "Hello", ",", "big", "world", "!"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    texts = ["Hello   big world !", "Hello", ""]
    assert truncate_tokens(texts, tokenizer, 2) == ["Hello   big", "Hello", ""]
    assert truncate_tokens(texts, tokenizer, 4) == texts
    with pytest.raises(SaealignError, match="max_tokens"):
        truncate_tokens(texts, tokenizer, 0)


def test_read_topic_union(tmp_path: Path) -> None:
    write(tmp_path / "t1.txt", "heart attack\n\n  cardiac arrest  \n")
    write_jsonl(tmp_path / "t2.jsonl.gz", [{"text": "cardiac arrest"}, {"text": "stroke", "label": "x"}])
    topic = read_topic([tmp_path / "t1.txt", str(tmp_path / "t2.jsonl.gz")], texts=["fever", "heart attack", " "])
    assert topic == ["heart attack", "cardiac arrest", "stroke", "fever"]
    assert read_topic(tmp_path / "t1.txt") == ["heart attack", "cardiac arrest"]
    assert read_topic(texts=["only"]) == ["only"]


def test_read_topic_errors(tmp_path: Path) -> None:
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "blank.txt", "  \n\t\n\n")
    write(tmp_path / "latin1.txt", "one\ntwo\ncaf\xe9\n".encode("latin-1"))
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(SaealignError, match=f"topic file .*{name} has no texts: put one example text a line"):
            read_topic([tmp_path / name])
    with pytest.raises(SaealignError, match=r"latin1\.txt line 3 is not UTF-8: save the file as UTF-8"):
        read_topic([tmp_path / "latin1.txt"])
    with pytest.raises(SaealignError, match=r"topic file .*missing\.txt not found"):
        read_topic([tmp_path / "missing.txt"])
    with pytest.raises(SaealignError, match="no topic texts given"):
        read_topic([])


def test_hf_without_datasets_or_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SaealignError, match="needs the datasets package"):
        read_corpus("hf:org/name")

    def offline(name: str, split: str) -> None:
        raise ConnectionError("no route to hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SaealignError, match="cannot load HF dataset 'org/name' split 'test' .*ConnectionError"):
        read_corpus("hf:org/name:test")


def test_hf_rows_and_class_label_names(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDataset(list):
        features = {"label": types.SimpleNamespace(names=["negative", "positive"])}

    def load_dataset(name: str, split: str) -> FakeDataset:
        assert (name, split) == ("org/reviews", "train")
        return FakeDataset([{"text": "bad", "label": 0}, {"text": "good", "label": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = read_corpus("hf:org/reviews")
    assert corpus.texts == ["bad", "good"] and corpus.labels == ["negative", "positive"]
    assert corpus.sources == ["hf:org/reviews"] * 2
