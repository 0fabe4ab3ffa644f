"""The demo's inputs (shared data, else the package's own files) and its side-by-side table."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

import saealign.demo as demo
from saealign.defaults import TOPICS_DIR
from saealign.errors import SaealignError
from saealign.reference.text_files import read_topic
from saealign.steering.aligner import Generation

METAPHORS = ["Her heart is a battlefield.", "The economy has a fever.", "My code is a wound."]


def shared_folder(root: Path, n_medquad: int = 60) -> Path:
    """A stand-in for ``../shared/data``: ``n_medquad`` MedQuAD lines (plus a blank one) and the metaphor prompts."""
    (root / "topics").mkdir(parents=True)
    lines = [json.dumps({"text": f"medical answer number {i}"}) for i in range(n_medquad)]
    with gzip.open(root / "topics" / "medical_medquad.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    (root / "topics" / "medical_metaphors.txt").write_text("\n".join(METAPHORS) + "\n\n")
    return root


def use_shared(monkeypatch: pytest.MonkeyPatch, folder: Path | None) -> None:
    monkeypatch.setattr(demo, "shared_data_dir", lambda: folder)


def test_demo_inputs_from_the_shared_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_shared(monkeypatch, shared_folder(tmp_path))
    texts, name = demo.demo_topic()
    every = {f"medical answer number {i}" for i in range(60)}
    assert len(texts) == 50 == len(set(texts)) and set(texts) <= every
    assert name == "50 texts of medical_medquad.jsonl.gz"
    assert demo.demo_topic() == (texts, name)  # seeded
    assert set(demo.demo_topic(seed=1)[0]) != set(texts)
    prompts, prompts_name = demo.demo_prompts()
    assert prompts == METAPHORS
    assert "medical-metaphor" in prompts_name


def test_demo_inputs_fall_back_to_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package_topic = read_topic([TOPICS_DIR / "medical.txt"])
    package_prompts = read_topic([demo.PACKAGE_PROMPTS])
    assert (len(package_topic), len(package_prompts)) == (20, 16)
    for folder in (None, tmp_path):  # no shared folder, or one without the files
        use_shared(monkeypatch, folder)
        assert demo.demo_topic() == (package_topic, "medical.txt (package example)")
        assert demo.demo_prompts() == (package_prompts, "neutral prompts (shared data not found)")


def test_demo_topic_with_a_short_medquad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_shared(monkeypatch, shared_folder(tmp_path, n_medquad=10))
    try:
        texts, _ = demo.demo_topic()
    except SaealignError:
        return  # a clear one-line error is fine too
    assert sorted(texts) == sorted(f"medical answer number {i}" for i in range(10))


# -- the side-by-side table --------------------------------------------------------------------------
def gen(prompt: str, text: str, contamination: float | None, method: str = "none") -> Generation:
    n = len(text.split())
    return Generation(prompt=prompt, method=method, mode="error", strength=1.0, text=text, tokens=text.split(),
                      token_ids=list(range(n)), token_contamination=None if contamination is None else [contamination] * n,
                      contamination=contamination, n_changed=[0] * n, topic_index=None, finish_reason="length", seed=0)


def render(plain: list[Generation], steered: list[Generation], title: str = "demo") -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(demo.side_by_side(plain, steered, title))
    return console.export_text()


def test_side_by_side_shows_texts_and_contamination() -> None:
    plain = [gen("The economy is", " growing slowly this year.", 0.1234), gen("My day was", " long.", None)]
    steered = [gen("The economy is", " sick with a fever.", 0.4567, "swap"),
               gen("My day was", " spent at the clinic.", 0.05, "swap")]
    out = render(plain, steered, "metaphors: unsteered vs Swap")
    for needle in ("metaphors: unsteered vs Swap", "swap (error, strength 1)", "The economy is", "My day was",
                   "growing slowly this year.", "sick with a fever.", "long.", "spent at the clinic.",
                   "contamination 0.123", "contamination 0.457", "contamination 0.050"):
        assert needle in out, needle
    assert out.count("contamination") == 3  # the unmeasured generation shows no number


def test_side_by_side_shows_markup_in_texts_literally() -> None:
    plain = [gen("a prompt", " [bold]loud[/bold] and [/dim] odd", 0.5)]
    steered = [gen("a prompt", " [red]not red[/red]", None, "swap")]
    out = render(plain, steered)
    assert "[bold]loud[/bold] and [/dim] odd" in out
    assert "[red]not red[/red]" in out


def test_side_by_side_shows_markup_in_prompts_literally() -> None:
    prompt = "The [bold]patient[/bold] is [/x]"
    out = render([gen(prompt, " fine.", 0.5)], [gen(prompt, " well.", 0.5, "swap")])
    assert prompt in out
