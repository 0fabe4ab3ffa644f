"""One description of a generation request: :class:`GenerationSpec`, and the vocabulary it uses.

The CLI, the server, the evaluation and the strength search all build a ``GenerationSpec`` and pass
it to :class:`saealign.steering.aligner.Aligner`; nothing else carries generation options. The
method and mode names, the unscored-latent policies and the strength rules live here and only here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from saealign.errors import SaealignError

METHODS = ("none", "sae", "clamp", "swap", "weight", "add", "swap_add", "diffmean")
"""``none`` (no edit), ``sae`` (the SAE alone), the paper's ``clamp``/``swap``/``weight``, and the additive
methods: ``add`` (topic direction built from the decoder rows of the best latents), ``swap_add``
(Swap's re-ranking plus that direction) and the SAE-free control ``diffmean`` (the difference of mean residuals,
topic texts minus the model's own text, :mod:`saealign.steering.mean_shift`). See :mod:`saealign.steering.edits`."""
ADDITIVE = ("add", "swap_add", "diffmean")
"""Methods that push along a topic direction (and read ``feedback``, ``prompt_boost``, ``companion_push``; those
built from SAE latents, :data:`LATENT_DIRECTIONS`, also ``n_latents``, ``output_scores``, ``contrast``,
``output_match``)."""
LATENT_DIRECTIONS = ("add", "swap_add")
"""Additive methods whose direction is built from the decoder rows of the topic's best latents."""
PUSH_ONLY = ("add", "diffmean")
"""Additive methods that leave the latents alone and only push (``swap_add`` also re-ranks them)."""
TOPIC_METHODS = ("clamp", "swap", "weight", "add", "swap_add", "diffmean")
"""Methods that need a topic."""
STRENGTH_METHODS = ("swap", "weight", "add", "swap_add", "diffmean")
"""Methods that read ``strength`` (the others ignore it) and that ``strength="auto"`` can search."""
MODES = ("error", "replace")
"""``error``: x + dec(a') − dec(a) (an unedited SAE is the identity); ``replace``: dec(a') (the paper)."""
UNSCORED = ("neutral", "drop")
"""What Swap/Weight do with latents the topic did not score (too few reference prompts): ``neutral``
weighs them as an average scored latent (no evidence either way); ``drop`` gives them weight 0 (the
paper's arithmetic: 0 ** strength)."""
AUTO = "auto"
DEFAULT_METHOD = "add"
"""What a request with a topic and no method gets: chosen by ``saealign eval steer-bench`` (docs/results.md)."""

DEFAULT_STRENGTH: dict[str, float] = {"swap": 1.0, "weight": 1.0, "add": 0.05, "swap_add": 0.3, "diffmean": 0.05}
"""What ``strength=None`` (a request that names none) means per method. Swap and Weight: the paper's 1. The
additive methods: 0.05 (add: each generated token's push, with the prompt pushed 4 times as hard, the concept slot at 1,
sampled at temperature 1.2; :data:`DEFAULT_PROMPT_BOOST`, :data:`DEFAULT_SLOT_PUSH`, :data:`DEFAULT_TEMPERATURE`) and
0.3 (swap_add) × the median residual norm, chosen by ``saealign eval steer-bench`` (docs/results.md, runs 14b and 14c:
the one setting measured that meets every target, topic hit rate above prompting's at judge perplexity within 1.15x
and distinct-2 above 0.9x of the unsteered text's, over the benchmark's 12 topics, on two held-out blocks of 4 seeds;
one global number, no per-topic tuning; the push before it, 0.15 with the prompt unboosted and the slot at 0.5, steered
harder, 0.90 against 0.81, and repeated itself, 0.86x distinct-2). ``"auto"`` searches a strength per topic instead.
With companion layers on (:attr:`GenerationSpec.companion_push`) the number is shared between the layers
(:data:`COMPANION_MAIN_SHARE`). ``diffmean`` takes add's whole recipe, so the two compare at the same push."""
FEEDBACK_STRENGTH: dict[str, float] = {**DEFAULT_STRENGTH, "add": 0.35}
"""The same with ``feedback=True``: the push is full only while the text is off topic, so add's is higher."""

DEFAULT_PROMPT_BOOST: dict[str, float] = {"add": 4.0, "diffmean": 4.0}
"""What ``prompt_boost=None`` means for a method without topic feedback (:attr:`GenerationSpec.prompt_boost`):
how many times harder the prompt is pushed than each generated token. add and diffmean: 4, part of the default
recipe (:data:`DEFAULT_STRENGTH`): the topic is set in the prompt and the concept slot, and the generated tokens are
pushed lightly, which repeats the topic's stock phrases less (docs/results.md, runs 14-14c). Without the slot and the
temperature the boost had been no gain (run 5: add 0.2 with the prompt at x3, 0.729 hit rate at 1.130x judge
perplexity, against 0.727 at 1.131x for the constant 0.25). The other methods: 1 (a constant push)."""
PROMPT_BOOST_MAX = 10.0

DEFAULT_COMPANION_PUSH = 4 / 3
"""What ``companion_push=None`` means when the aligner has companion layers (:attr:`GenerationSpec.companion_push`):
each companion layer is pushed 4/3 × its weight as hard as the main one; chosen by ``saealign eval steer-bench``
(docs/results.md, runs 7 and 8)."""
COMPANION_MAIN_SHARE = 2 / 3
"""With companion layers on, the main layer is pushed ``strength × 2/3`` (and each companion ``× companion_push × its
weight`` of that), so one strength scale (numbers, ``auto``) serves aligners with and without companions."""
COMPANION_PUSH_MAX = 8.0
"""The largest companion push (times the main layer's); the companion's own push also stays within the method's
strength range."""

DEFAULT_TUNE_STEPS: dict[str, int] = {"add": 0}
"""What ``tune_steps=None`` means (:attr:`GenerationSpec.tune_steps`): how many steps tune ``add``'s latent mix on
the topic texts (:mod:`saealign.steering.tuning`); every other method has nothing to tune."""
TUNE_STEPS_MAX = 200

DEFAULT_SLOT_PUSH: dict[str, float] = {"add": 1.0, "diffmean": 1.0}
"""What ``slot_push=None`` means (:attr:`GenerationSpec.slot_push`): how hard the concept slot's placeholder is
pushed, in strength units (× each layer's residual norm, in the layers' shares). add and diffmean: 1, part of the
default recipe (:data:`DEFAULT_STRENGTH`; docs/results.md, runs 14b and 14c). The slot alone had been chosen at 0.5
beside add's earlier 0.15 (run 13: 0.846 hit rate at 1.010x judge perplexity against 1.063x with the slot at 1, and
0.823 at 1.061x without a slot). The other methods: 0 (no slot)."""
SLOT_PUSH_MAX = 4.0
"""The hardest slot push: past it the placeholder's residual is the push alone, and a harder one read worse (2 steered
less than 1 on the benchmark's screen, run 13)."""

DEFAULT_TEMPERATURE: dict[str, float] = {"add": 1.2, "diffmean": 1.2}
"""What ``temperature=None`` means (:attr:`GenerationSpec.temperature`): add and diffmean sample at 1.2, part of the
default recipe (:data:`DEFAULT_STRENGTH`). A lightly pushed model has fluency to spare and repeats the topic's stock
phrases across continuations; sampling hotter buys variety with that spare fluency (docs/results.md, run 14b: the
recipe at 1.2 read 0.922x distinct-2 at 1.118x judge perplexity, at 1 0.888x at 0.969x). Every other method: 1 (the
model's own distribution over the ``top_k`` best tokens; prompting sampled at 1.2 read 0.762 hit rate at 1.112x against
0.772 at 0.980x)."""

STRENGTH_RANGE: dict[str, tuple[float, float]] = {
    "swap": (0.0, 8.0),
    "weight": (0.0, 8.0),
    "add": (0.0, 2.0),
    "swap_add": (0.0, 2.0),
    "diffmean": (0.0, 2.0),
}
"""The strengths each method can use. Swap/Weight weigh latents by ``score ** strength``: past 8 every
weight but the top few underflows and the edit is the same as at 8. The additive methods add
``strength × median residual norm`` along a unit direction: past 2 the direction swamps the residual
and the text is no longer language."""


def parse_strength(value: object, method: str = "swap") -> float | str:
    """``"auto"`` or a finite number within the method's range (:data:`STRENGTH_RANGE`), from any input.

    Accepts numbers and their text (CLI, JSON); refuses ``inf``, ``nan``, booleans and other words
    with one line that says what the method takes.
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise SaealignError(f"strength must be a number or 'auto', got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SaealignError(f"strength must be a number or 'auto', got {value!r}") from None
    low, high = STRENGTH_RANGE.get(method, (0.0, math.inf))
    if not math.isfinite(number) or not low <= number <= high:
        span = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise SaealignError(f"strength for {method} must be {span} (or auto), got {value!r}")
    return number


@dataclass(frozen=True)
class GenerationSpec:
    """How to generate and how to steer: one frozen value per request (seeds and prompts travel apart).

    ``GenerationSpec(method="swap", strength=1)`` is the paper's Swap; ``replace(spec, top_k=10)``
    derives another. Every field is checked on construction, so a spec that exists is valid.
    """

    method: str = DEFAULT_METHOD
    """One of :data:`METHODS`."""
    mode: str = "error"
    """One of :data:`MODES` (the edit-based methods; the additive ones always add to x)."""
    strength: float | str | None = None
    """A number within :data:`STRENGTH_RANGE` for the method, ``"auto"`` (searched per topic), or None: the
    method's :data:`DEFAULT_STRENGTH` (resolved on construction, so a spec always holds a number or "auto")."""
    max_new_tokens: int = 64
    top_k: int = 5
    """Sample among the ``top_k`` most likely tokens (the paper: 5)."""
    temperature: float | None = None
    """Divides the logits before sampling; None = the method's :data:`DEFAULT_TEMPERATURE` (1 where it names none),
    resolved on construction."""
    greedy: bool = False
    """Take the most likely token (deterministic; top_k, temperature and seeds unused)."""
    chat: bool = False
    """Wrap each prompt in the tokenizer's chat template."""
    steer_prompt: bool = True
    """Edit the prompt's positions too (False: only the positions that predict new tokens)."""
    clamp_n: int = 5
    """Clamp: how many of the highest-scoring latents are forced on."""
    clamp_multiplier: float = 10.0
    """Clamp: forced value as a multiple of each latent's max activation over the reference set."""
    unscored: str = "drop"
    """Swap/Weight: what latents without a score weigh (:data:`UNSCORED`)."""
    n_latents: int = 64
    """Additive methods: how many of the best latents build the topic direction."""
    output_scores: bool = True
    """Additive methods: weigh each latent's topic score by its output score (False: topic scores alone)."""
    contrast: bool = True
    """Additive methods: weigh each latent also by how much more it fires on the topic texts than on reference
    text, the corpus and the model's own (:mod:`saealign.reference.contrast`; False: M1 scores and output scores
    alone)."""
    output_match: bool = True
    """Additive methods: weigh each latent also by how near the words it makes the model say are to the topic texts
    (:mod:`saealign.steering.descriptions`; needs the aligner's embedder; False: leave that factor out)."""
    feedback: bool = False
    """Additive methods: fade the push, row by row, as the generated text reads like the topic
    (:mod:`saealign.steering.feedback`; False: a constant push). Its default strength is higher
    (:data:`FEEDBACK_STRENGTH`). Off by default: on the benchmark it lands on the constant push's frontier."""
    prompt_boost: float | None = None
    """Additive methods: the prompt pass is pushed this many times harder than the generated tokens (1 = one
    push throughout; 0 = the prompt unpushed; None = :data:`DEFAULT_PROMPT_BOOST`, resolved on construction).
    The prompt's push reaches every later token through the attention cache, so a harder push there might set
    the topic more cheaply than a harder push on every new token; on the benchmark it did not, at equal
    perplexity (docs/results.md, run 5). With ``steer_prompt=False`` it applies to the last prompt position
    alone."""
    companion_push: float | None = None
    """Additive methods: also push at the aligner's companion layers (earlier blocks, each with its own SAE,
    :attr:`saealign.steering.aligner.Aligner.companions`) along the topic direction each layer's SAE gives, this many
    times × the companion's weight as hard as the main layer (each in its own layer's residual norm); the main layer
    then takes :data:`COMPANION_MAIN_SHARE` of ``strength``. Moderate pushes at several depths buy more topic than one
    harder push at equal fluency (docs/results.md, runs 7 and 8). 0 = one layer (the main layer takes the whole
    strength); None = :data:`DEFAULT_COMPANION_PUSH` where the aligner has companion layers, else 0 (resolved by the
    aligner)."""

    tune_steps: int | None = None
    """``add``: tune the mix of the topic's latents (each layer's weights, never the model) for this many Adam steps so
    that the pushed model finds the topic texts likely (:mod:`saealign.steering.tuning`; once per topic texts and
    strength, cached on disk); 0 = the weights as the latents' statistics give them; None =
    :data:`DEFAULT_TUNE_STEPS`. With ``strength="auto"`` the search runs on the untuned mix and the mix is then
    tuned at the strength it chose."""

    slot_push: float | None = None
    """Additive methods: read each steered prompt after a fixed instruction whose placeholder word is pushed this hard
    along the topic direction, in strength units at every pushed layer (:mod:`saealign.steering.slot`: the model reads
    "notes on <the topic>" with no topic word written); 0 = no slot; None =
    :data:`DEFAULT_SLOT_PUSH`, resolved on construction. The other methods have no topic direction and ignore it; a row
    auto finds nothing to steer by (strength 0) gets no slot."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SaealignError(f"unknown steering method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise SaealignError(f"unknown steering mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.unscored not in UNSCORED:
            raise SaealignError(f"unknown unscored policy {self.unscored!r}: use one of {', '.join(UNSCORED)}")
        defaults = FEEDBACK_STRENGTH if self.feedback else DEFAULT_STRENGTH
        strength = defaults.get(self.method, 1.0) if self.strength is None else self.strength
        object.__setattr__(self, "strength", parse_strength(strength, self.method))
        if self.max_new_tokens < 1:
            raise SaealignError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.top_k < 1:
            raise SaealignError(f"top_k must be at least 1, got {self.top_k}")
        temperature = DEFAULT_TEMPERATURE.get(self.method, 1.0) if self.temperature is None else self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or (
                not self.greedy and not (temperature > 0 and math.isfinite(temperature))):
            raise SaealignError(f"temperature must be a finite number > 0, got {temperature!r}: or use greedy")
        object.__setattr__(self, "temperature", float(temperature))
        if self.clamp_n < 1:
            raise SaealignError(f"clamp_n must be at least 1, got {self.clamp_n}")
        if not (self.clamp_multiplier > 0 and math.isfinite(self.clamp_multiplier)):
            raise SaealignError(f"clamp_multiplier must be a finite number > 0, got {self.clamp_multiplier}")
        if self.n_latents < 1:
            raise SaealignError(f"n_latents must be at least 1, got {self.n_latents}")
        high = STRENGTH_RANGE.get(self.method, (0.0, math.inf))[1]
        push = 0.0 if self.is_auto or self.method not in ADDITIVE else float(self.strength)  # type: ignore[arg-type]
        companion = self.companion_push
        if companion is not None:
            if isinstance(companion, bool) or not isinstance(companion, (int, float)) or not 0 <= companion <= COMPANION_PUSH_MAX:
                raise SaealignError(f"companion_push must be a number from 0 to {COMPANION_PUSH_MAX:g}, got {companion!r}")
            object.__setattr__(self, "companion_push", float(companion))  # 0 and 0.0 are one setting (cache keys)
        boost = self.prompt_boost
        if boost is None:
            boost = 1.0 if self.feedback else DEFAULT_PROMPT_BOOST.get(self.method, 1.0)
            # a strong push (at the main layer or, named, a companion's): the default boost gives way
            reach = push * max(1.0, COMPANION_MAIN_SHARE * (companion or 0.0))
            if reach > 0:
                boost = min(boost, max(1.0, high / reach))
            object.__setattr__(self, "prompt_boost", boost)
        if isinstance(boost, bool) or not isinstance(boost, (int, float)) or not 0 <= boost <= PROMPT_BOOST_MAX:
            raise SaealignError(f"prompt_boost must be a number from 0 to {PROMPT_BOOST_MAX:g}, got {boost!r}")
        if push * boost > high:
            raise SaealignError(f"strength {self.strength} x prompt_boost {boost:g} pushes the prompt past {self.method}'s "
                                f"largest strength ({high:g}): lower one of them")
        if push * boost * COMPANION_MAIN_SHARE * (companion or 0.0) > high:
            raise SaealignError(f"strength {self.strength} x companion_push {companion:g} pushes the companion layer "
                                f"past {self.method}'s largest strength ({high:g}): lower one of them")

        steps = DEFAULT_TUNE_STEPS.get(self.method, 0) if self.tune_steps is None else self.tune_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= TUNE_STEPS_MAX:
            raise SaealignError(f"tune_steps must be a whole number from 0 to {TUNE_STEPS_MAX}, got {steps!r}")
        if steps and self.method != "add":
            raise SaealignError(f"tune_steps tunes add's mix of latents; {self.method} has none: steer with "
                                "method add, or tune_steps=0")
        object.__setattr__(self, "tune_steps", steps)

        slot = DEFAULT_SLOT_PUSH.get(self.method, 0.0) if self.slot_push is None else self.slot_push
        if isinstance(slot, bool) or not isinstance(slot, (int, float)) or not 0 <= slot <= SLOT_PUSH_MAX:
            raise SaealignError(f"slot_push must be a number from 0 to {SLOT_PUSH_MAX:g}, got {slot!r}")
        object.__setattr__(self, "slot_push", float(slot))

    @property
    def needs_topic(self) -> bool:
        return self.method in TOPIC_METHODS

    @property
    def boost(self) -> float:
        """:attr:`prompt_boost` as resolved on construction (always a number)."""
        return float(self.prompt_boost)  # type: ignore[arg-type]

    @property
    def heat(self) -> float:
        """:attr:`temperature` as resolved on construction (always a number)."""
        return float(self.temperature)  # type: ignore[arg-type]

    @property
    def slot(self) -> float:
        """:attr:`slot_push` as resolved on construction (always a number; 0 = no slot)."""
        return float(self.slot_push)  # type: ignore[arg-type]

    @property
    def is_auto(self) -> bool:
        return self.strength == AUTO

    def unsteered(self) -> GenerationSpec:
        """The same request unsteered (method ``none``, nothing tuned), for side-by-side views: sampled at the
        temperature unsteered text gets by default, unless this spec's temperature is not its method's default (one
        the user chose, which the unsteered side keeps)."""
        chosen = self.heat != DEFAULT_TEMPERATURE.get(self.method, 1.0)
        return replace(self, method="none", tune_steps=0, temperature=self.temperature if chosen else None)

    def with_strength(self, strength: float | str) -> GenerationSpec:
        return replace(self, strength=strength)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
