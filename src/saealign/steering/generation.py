"""What aligned generation returns: :class:`TokenEvent` per token while streaming, :class:`Generation` per prompt.

:meth:`saealign.steering.aligner.Aligner.generate` returns one :class:`Generation` per prompt;
:meth:`~saealign.steering.aligner.Aligner.stream` yields a :class:`TokenEvent` per token and then the
same :class:`Generation`, so a server or a page never re-derives the text, the finish reason or the
summary. Both are assembled here, from the same per-token records, by :class:`RowRecord`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Generation:
    """One prompt's continuation and how it was steered."""

    prompt: str
    method: str
    mode: str
    strength: float
    """The strength used (``auto`` resolved; 1.0 for methods that ignore it)."""
    text: str
    """The generated continuation only (special tokens removed)."""
    tokens: list[str]
    """Text piece of each generated token ("" for special tokens); joined they make ``text``."""
    token_ids: list[int]
    """Generated token ids, the end-of-sequence token included when it ended the row."""
    token_contamination: list[float] | None
    """One value per generated token, in [0, 1]; None without a topic."""
    contamination: float | None
    """Mean of ``token_contamination``; None without a topic."""
    n_changed: list[int]
    """Latents changed by the edit at the position that predicted each token."""
    topic_index: int | None
    """Which topic of the list this row used (0 for a single topic; None without one)."""
    finish_reason: str
    """``eos`` (the model ended the text) or ``length`` (``max_new_tokens`` reached)."""
    seed: int
    prompt_tokens: int = 0
    """Tokens of the prompt as fed to the model (chat template and BOS included)."""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class TokenEvent:
    """One token as :meth:`Aligner.stream` produces it."""

    text: str
    """Its text piece ("" while a multi-byte character is incomplete, and for special tokens)."""
    token_id: int
    contamination: float | None
    index: int
    """0-based position among the generated tokens."""


@dataclass
class RowRecord:
    """One row's tokens as they are produced; :meth:`generation` turns them into its :class:`Generation`."""

    prompt: str
    prompt_tokens: int
    seed: int
    strength: float
    topic_index: int | None
    measured: bool
    """Whether contamination is recorded (a topic was given and the hook records)."""
    ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    contamination: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    finish_reason: str = "length"

    def add(self, event: TokenEvent, n_changed: int, finish_reason: str | None) -> None:
        self.ids.append(event.token_id)
        self.pieces.append(event.text)
        self.changed.append(n_changed)
        if event.contamination is not None:
            self.contamination.append(event.contamination)
        self.finish_reason = finish_reason or self.finish_reason

    def generation(self, text: str, method: str, mode: str) -> Generation:
        """The finished row; ``text`` is the tokenizer's decode of :attr:`ids` (special tokens removed)."""
        contam = self.contamination if self.measured else None
        return Generation(
            prompt=self.prompt, method=method, mode=mode, strength=self.strength, text=text, tokens=self.pieces,
            token_ids=self.ids, token_contamination=contam,
            contamination=sum(contam) / len(contam) if contam else None, n_changed=self.changed,
            topic_index=self.topic_index, finish_reason=self.finish_reason, seed=self.seed,
            prompt_tokens=self.prompt_tokens,
        )
