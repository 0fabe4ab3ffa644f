"""The concept slot: a fixed instruction before the prompt whose placeholder word is pushed along the topic direction.

An instruction naming the topic ("The following text is about medicine.") steers a small model cheaply: the topic
sits in the context, and the generated tokens, left alone, stay fluent. saealign's user gives example texts, not a
name. The slot gives the model the instruction without the name: every steered prompt is read after
:data:`SLOT_TEMPLATE`, and the residual of its placeholder word (:data:`SLOT_WORD`) is pushed hard along the topic
direction at every pushed layer, so the model reads "notes on <the topic's latents>". Injecting a
representation at a placeholder token of a fixed prompt is how Patchscopes (Ghandeharioun et al. 2024) and SelfIE
(Chen et al. 2024) make a model read out a hidden state; here it writes the topic in.

The template is the same for every topic and the slot carries the topic through the SAE's latents alone, so no
topic word is ever written. The returned text is the continuation of the user's prompt: the template is fed, never
shown. On ``saealign eval steer-bench`` the first template ("The following text is about something.") alone, its slot
unpushed, added no topic and lowered the judge's perplexity of the continuation by about 8 %; the pushed slot adds the
topic (docs/results.md, runs 13 and 13b).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from saealign.errors import SaealignError

SLOT_WORD = " something"
"""The placeholder: a word the instruction reads naturally with, whose residual takes the topic's push."""
SLOT_TEMPLATE = f"Notes on{SLOT_WORD}.\n\n"
"""What every steered prompt is read after: a heading with the placeholder where the topic's name would go. On the
benchmark it beat the prompting row's own instruction with a placeholder ("The following text is about something.") on
hit rate and distinct-2 at equal perplexity (docs/results.md, run 13b)."""


def slotted(prompt: str) -> str:
    """``prompt`` as the model reads it with the slot: :data:`SLOT_TEMPLATE` + ``prompt``."""
    return SLOT_TEMPLATE + prompt


def slot_ids(tokenizer: Any) -> list[int]:
    """The token ids of :data:`SLOT_WORD` (one for most tokenizers; the slot is the last of them)."""
    ids = [int(t) for t in tokenizer(SLOT_WORD, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise SaealignError(f"the tokenizer encodes the slot word {SLOT_WORD!r} to no tokens: steer with slot_push=0")
    return ids


def slot_position(ids: Sequence[int], word: Sequence[int]) -> int:
    """Where the slot sits in a prompt's token ``ids``: the last token of the first occurrence of ``word`` (the
    template comes first, so its placeholder is the first occurrence). One error line where the tokenizer split the
    word differently inside the template."""
    n = len(word)
    for start in range(len(ids) - n + 1):
        if list(ids[start:start + n]) == list(word):
            return start + n - 1
    raise SaealignError(f"the tokenizer splits the slot word {SLOT_WORD!r} differently inside the slot template: "
                        "steer with slot_push=0")
