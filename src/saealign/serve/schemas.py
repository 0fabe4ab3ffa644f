"""What the HTTP API accepts: the server's limits, its one error type and the request bodies.

One topic shape everywhere: ``topic`` is a topic id (from ``POST /v1/topics``) or a list of topic
texts. ``/v1/generate`` also accepts the older ``topic_id`` / ``topic_texts`` as aliases (documented
in the schema; one of the three at most). The steering fields are those of
:class:`saealign.steering.spec.GenerationSpec`, with its vocabulary, so a new method appears here by itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from saealign.errors import SaealignError
from saealign.reference.scoring import METRICS, SUMMARIES
from saealign.steering.spec import (
    COMPANION_MAIN_SHARE,
    DEFAULT_COMPANION_PUSH,
    DEFAULT_METHOD,
    DEFAULT_PROMPT_BOOST,
    DEFAULT_SLOT_PUSH,
    DEFAULT_TEMPERATURE,
    DEFAULT_TUNE_STEPS,
    METHODS,
    MODES,
    UNSCORED,
)

Method = Literal[METHODS]  # type: ignore[valid-type]
Mode = Literal[MODES]  # type: ignore[valid-type]
Unscored = Literal[UNSCORED]  # type: ignore[valid-type]


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for, and how the worker batches."""

    max_body_bytes: int = 1_000_000
    """Larger request bodies get 413."""
    max_topic_texts: int = 200
    """Texts per topic."""
    max_new_tokens: int = 256
    """Tokens one generation may ask for."""
    max_prompts: int = 16
    """Prompts per request."""
    max_batch_rows: int = 32
    """Rows of one :meth:`Aligner.generate` call (several requests together)."""
    max_streams: int = 4
    """Streams advanced together; more wait for a free slot."""
    max_topics: int = 256
    """Scored topics kept (least recently used dropped first)."""
    max_tune_steps: int = 32
    """``tune_steps`` one request may ask for: each step is a forward and backward pass over the topic texts on the
    model thread (about 1-3 s for the default model on a 2-core CPU), once per topic and strength."""
    batch_window_s: float = 0.005
    """How long an idle worker waits for more requests before it starts a batch."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value >= (0 if name == "batch_window_s" else 1):
                raise SaealignError(f"ServerLimits.{name} must be positive, got {value}")


class ApiError(Exception):
    """A request the server refuses: answered as ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


TOPIC = Field(default=None, description="a topic id (POST /v1/topics) or the topic's texts")


class TopicRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(description="example texts of the topic (10-50 work well)")
    min_prompts: int = Field(20, ge=1, description="latents firing on fewer reference prompts are unscored")
    summary: Literal[SUMMARIES] = "normalized_sum"  # type: ignore[valid-type]
    metric: Literal[METRICS] = "euclidean"  # type: ignore[valid-type]
    top: int = Field(10, ge=1, le=100, description="latents shown")
    examples: int = Field(2, ge=0, le=10, description="reference texts shown per latent")


class SteeringOptions(BaseModel):
    """The steering fields of a :class:`~saealign.steering.spec.GenerationSpec` (checked by the spec itself)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    method: Method | None = Field(default=None, description=f"default: {DEFAULT_METHOD} with a topic, none without")
    mode: Mode = "error"
    strength: float | Literal["auto"] | None = Field(
        default=None, description="how hard the method steers, within its range (add: x median residual norm; "
                                  "Swap/Weight: scores**strength, 1 = the paper); null = the method's default "
                                  "(add and diffmean 0.05, add 0.35 with feedback; swap_add 0.3; Swap/Weight 1); auto = the "
                                  "strongest within the fluency budget, searched once per topic")
    steer_prompt: bool = Field(default=True, description="also edit the prompt's positions")
    clamp_n: int = Field(default=5, description="clamp: latents forced on")
    clamp_multiplier: float = Field(default=10.0, description="clamp: forced value as a multiple of the max activation")
    unscored: Unscored = Field(default="drop", description="swap/weight: what latents the topic did not score weigh")
    n_latents: int = Field(default=64, description="add, swap_add: latents in the topic direction")
    output_scores: bool = Field(default=True, description="add, swap_add: weigh latents by their output scores too")
    contrast: bool = Field(default=True, description="add, swap_add: weigh latents by how much more they fire on "
                                                     "the topic texts than on reference text (the corpus and the "
                                                     "model's own unsteered text)")
    output_match: bool = Field(default=True, description="add, swap_add: weigh latents by how near the words "
                                                         "they make the model say are to the topic texts")
    feedback: bool = Field(default=False, description="additive methods: fade the push as the generated text reads "
                                                     "like the topic")
    prompt_boost: float | None = Field(
        default=None, description="additive methods: push the prompt this many times harder than each generated "
                                  f"token; null = the default ({DEFAULT_PROMPT_BOOST['add']:g} for add and diffmean, else 1)")
    companion_push: float | None = Field(
        default=None, description="additive methods: also push at the served stack's companion layers, this many "
                                  "times (x each one's weight) as hard as the main layer, which then takes "
                                  f"{COMPANION_MAIN_SHARE:.3g} of the strength; 0 = one layer; null = "
                                  f"{DEFAULT_COMPANION_PUSH:.3g} where the stack has companion layers, else 0")
    tune_steps: int | None = Field(
        default=None, description="add: tune the mix of the topic's latents for this many steps so the pushed model "
                                  "finds the topic texts likely (once per topic and strength, cached); 0 = untuned; "
                                  f"null = the default ({DEFAULT_TUNE_STEPS['add']})")
    slot_push: float | None = Field(
        default=None, description="additive methods: read the prompt after 'Notes on something.' "
                                  "with the placeholder pushed this hard along the topic direction (strength units); "
                                  f"0 = no slot; null = the default ({DEFAULT_SLOT_PUSH['add']:g} for add and diffmean, else 0)")
    top_k: int = 5
    greedy: bool = False

    def spec_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude={"method"})


class GenerateRequest(SteeringOptions):
    prompt: str | None = None
    prompts: list[str] | None = None
    topic: str | list[str] | None = TOPIC
    topic_id: str | None = Field(default=None, description="alias of topic (an id)")
    topic_texts: list[str] | None = Field(default=None, description="alias of topic (its texts)")
    max_new_tokens: int | None = Field(default=None, description="default: 64 or the server's limit if lower")
    temperature: float | None = Field(
        default=None, description=f"divides the logits before sampling; null = the method's default "
                                  f"({DEFAULT_TEMPERATURE['add']:g} for add and diffmean, else 1)")
    seed: int | list[int] = 0
    chat: bool = False
    stream: bool = False

    def spec_fields(self) -> dict[str, Any]:
        return self.model_dump(include=set(SteeringOptions.model_fields) - {"method"} | {"temperature", "chat"})

    def topic_value(self) -> str | list[str] | None:
        """The topic, given once, under its name or one of its aliases."""
        given = [v for v in (self.topic, self.topic_id, self.topic_texts) if v is not None]
        if len(given) > 1:
            raise ApiError(400, "give the topic once: topic (an id or texts), or its alias topic_id or topic_texts")
        return given[0] if given else None


class OpenAIRequest(BaseModel):
    # OpenAI clients send fields saealign has no use for (top_p, user, ...): accept and ignore them
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str | None = None
    temperature: float | None = None
    n: int | None = 1
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    topic: str | list[str] | None = TOPIC
    saealign: SteeringOptions = Field(default_factory=lambda: SteeringOptions())


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
