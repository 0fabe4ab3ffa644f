"""WordNet 3.0 as a corpus: finding the database, parsing its ``data.*`` lines (wndb(5)), and reading
one ``lemma: definition`` text a synset (plus one a usage example), labelled with its lexicographer file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from saealign.errors import SaealignError
from saealign.reference.corpus import Corpus
from saealign.reference.text_files import text_lines

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/local/WordNet-3.0/dict")
"""Where ``wordnet`` looks for the database when no folder is given (after ``$WNHOME/dict``)."""

# The WordNet 3.0 ``lexnames`` file: lexicographer file number -> name (45 files).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip

_WORDNET_POS = ("noun", "verb", "adj", "adv")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives: long(a), used_to(p)
_QUOTED = re.compile(r'"([^"]*)"')


def find_wordnet(folder: Path | None = None) -> Path:
    """The folder holding WordNet's ``data.*`` files: ``folder``, else ``$WNHOME/dict``, else the usual places."""
    if folder is not None:
        candidates = [folder]
    else:
        wnhome = os.environ.get("WNHOME")
        candidates = ([Path(wnhome) / "dict"] if wnhome else []) + [Path(p) for p in WORDNET_DIRS]
    for c in candidates:
        if (c / "data.noun").is_file():
            return c
    where = folder if folder is not None else WORDNET_DIRS[0]
    raise SaealignError(
        f"WordNet database (data.noun ...) not found in {where}: install it (apt-get install wordnet-base), "
        "pass wordnet:/path/to/dict, or read a wordnet.jsonl.gz file"
    )


def parse_wordnet_line(line: str) -> tuple[str, str, str, list[str]] | None:
    """One line of a WordNet ``data.*`` file -> ``(lemma, lexname, definition, examples)``.

    The format (wndb(5)): ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt pointers ...
    [frames] | gloss``; ``w_cnt`` is hexadecimal and the gloss reads ``definition; "example"; ...``.
    Returns None for the licence header (lines starting with two spaces).
    """
    if line.startswith("  ") or not line.strip():
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    try:
        lexname = LEXNAMES[int(fields[1])]
        n_words = int(fields[3], 16)
        lemma = _ADJ_MARKER.sub("", fields[4]).replace("_", " ")
    except (IndexError, ValueError):
        raise SaealignError(f"not a WordNet data line: {line[:60]!r}: point wordnet: at a WordNet 3.0 dict") from None
    if n_words < 1:
        raise SaealignError(f"WordNet synset {fields[0]} has no words: the data file is damaged")
    gloss = gloss.strip()
    # The definition ends where the first quoted example starts (after '; ', or ': ' in a few
    # glosses); a quote inside the definition ('as in "carrot and stick"') is not an example.
    first = re.search(r'(?:^|[;:]\s*)"', gloss)
    definition = (gloss[: first.start()] if first else gloss).strip().rstrip(";").strip()
    examples = [e.strip() for e in _QUOTED.findall(gloss[first.start() :])] if first else []
    return lemma, lexname, definition, [e for e in examples if e]


def read_wordnet(folder: Path | None = None, include_examples: bool = True) -> Corpus:
    """WordNet 3.0 as a corpus: ``lemma: definition`` a synset (+ each usage example), labelled by lexname.

    Reads ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv`` in that order (117,659 synsets).
    """
    root = find_wordnet(folder)
    texts, labels = [], []
    for pos in _WORDNET_POS:
        path = root / f"data.{pos}"
        if not path.is_file():
            raise SaealignError(f"{path} is missing: the WordNet dict folder needs data.noun/verb/adj/adv")
        for _, line in text_lines(path):
            parsed = parse_wordnet_line(line)
            if parsed is None:
                continue
            lemma, lexname, definition, examples = parsed
            group = [f"{lemma}: {definition}"] + (examples if include_examples else [])
            texts += group
            labels += [lexname] * len(group)
    return Corpus(texts, labels, ["wordnet"] * len(texts), f"wordnet:{root}")
