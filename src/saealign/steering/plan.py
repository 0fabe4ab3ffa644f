"""One generation request resolved into what the decoding loop needs: token ids, topics, the steering hook.

Pure functions of the model, the SAE and a :class:`~saealign.steering.spec.GenerationSpec`;
:class:`saealign.steering.aligner.Aligner` calls them in order and owns what needs its state (the
reference index, the embedder, the strength search).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.scoring import TopicScores
from saealign.sae.autoencoder import SAE
from saealign.steering.directions import SteeringBasis, topic_direction
from saealign.steering.edits import Steering
from saealign.steering.feedback import TopicFeedback
from saealign.steering.hook import SteeringHook
from saealign.steering.spec import (
    ADDITIVE,
    LATENT_DIRECTIONS,
    STRENGTH_METHODS,
    GenerationSpec,
    parse_strength,
)

TopicArg = TopicScores | Sequence[TopicScores] | Sequence[str] | str | None
"""A topic argument: scores, several scores (with ``topic_per_row``), topic texts, or None."""


@dataclass(frozen=True)
class Plan:
    """Everything one generation call needs, resolved and checked."""

    prompts: list[str]
    rows: list[list[int]]
    """Token ids fed to the model, one list per prompt."""
    generators: list[torch.Generator]
    seeds: list[int]
    topic_index: list[int | None]
    hook: SteeringHook | None
    strengths: list[float]
    """The strength each row was steered with (``auto`` resolved per topic)."""
    spec: GenerationSpec
    companions: tuple[tuple[SteeringHook, nn.Module], ...] = ()
    """Further pushes, each a hook and the block it is attached to beside :attr:`hook` (the companion layers,
    :attr:`GenerationSpec.companion_push`); they steer and record nothing."""
    slots: tuple[int | None, ...] = ()
    """Per row, the index in :attr:`rows` of the concept slot's placeholder (:mod:`saealign.steering.slot`), None where
    the row has none; empty where no row has."""


def seeds_for(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per prompt: ``seed`` repeated, or the list checked against the prompts."""
    seeds = [seed] * n if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise SaealignError(f"{len(seeds)} seeds for {n} prompts: give one seed, or one per prompt")
    return seeds


def row_strengths(spec: GenerationSpec, strength_per_row: Sequence[float] | None, n: int) -> list[float] | None:
    """The rows' numeric strengths when they are known without a search (None: ``auto``, resolved per topic)."""
    if strength_per_row is not None:
        if len(strength_per_row) != n:
            raise SaealignError(f"{len(strength_per_row)} strengths for {n} prompts: give one per prompt, or none")
        return [float(parse_strength(s, spec.method)) for s in strength_per_row]
    if spec.method not in STRENGTH_METHODS:
        return [1.0] * n  # unused by the method: reported as 1
    return None if spec.is_auto else [float(spec.strength)] * n  # type: ignore[arg-type]


def steering(spec: GenerationSpec, strength: float) -> Steering:
    """The latent edit of ``spec`` at one numeric strength.

    The additive methods' strength scales their direction (:func:`directions_for`), not the edit:
    ``swap_add``'s Swap is the paper's, at strength 1.
    """
    edit_strength = 1.0 if spec.method in ADDITIVE else strength
    return Steering(spec.method, spec.mode, spec.clamp_n, spec.clamp_multiplier, edit_strength)


def directions_for(sae: SAE, spec: GenerationSpec, topics: list[TopicScores], per_row: list[int | None],
                   strengths: list[float], basis: SteeringBasis, matches: dict[int, np.ndarray] | None = None,
                   units: dict[int, Tensor] | None = None) -> Tensor:
    """``[batch, d_in]`` what the additive methods add to each row: strength × ρ × the row's topic direction.

    ``matches`` holds each topic's output match (by topic index) when ``spec.output_match`` is on. ``units`` holds
    each topic's unit direction where it comes from outside the latents' statistics: ``diffmean``'s mean shift
    (:mod:`saealign.steering.mean_shift`), whose direction it is, or ``add``'s tuned mix (``spec.tune_steps``,
    :mod:`saealign.steering.tuning`)."""
    used = sorted({j for j in per_row if j is not None})
    if units is not None and all(i in units for i in used):
        unit = {i: units[i].float().cpu() for i in used}
    elif spec.method not in LATENT_DIRECTIONS:
        raise SaealignError(f"{spec.method} needs each topic's mean shift: steer through Aligner.generate")
    else:
        unit = {i: topic_direction(sae, topics[i].as_tensor(unscored="drop"), spec.n_latents,
                                   *latent_factors(spec, topics[i], basis, matches.get(i) if matches else None))
                for i in used}
    rows = [unit[t] * (s * basis.residual_norm) if t is not None else torch.zeros(sae.d_in)
            for t, s in zip(per_row, strengths, strict=True)]
    return torch.stack(rows).to(sae.W_enc.device)


def latent_factors(spec: GenerationSpec, topic: TopicScores, basis: SteeringBasis,
                   match: np.ndarray | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(output scores, contrast, output match)``: the factors ``spec`` weighs the topic's latents by beside their
    M1 scores (None where it leaves one out; see :func:`saealign.steering.directions.topic_direction`)."""
    if spec.output_match and match is None:
        raise SaealignError("output_match needs each topic's output match: steer through Aligner.generate, or "
                            "with output_match=False")
    out = torch.as_tensor(basis.output_scores) if spec.output_scores else None
    return out, _contrast(topic, spec), torch.as_tensor(match) if spec.output_match and match is not None else None


def _topic_contrast(topic: TopicScores, option: str) -> np.ndarray:
    """The topic's activation contrast, or one error naming the spec option that needs it."""
    if topic.contrast is None:
        raise SaealignError("these topic scores carry no activation contrast (made from the index alone): score "
                            f"the topic with Aligner.topic, or steer with {option}=False")
    return topic.contrast


def _contrast(topic: TopicScores, spec: GenerationSpec) -> Tensor | None:
    return torch.as_tensor(_topic_contrast(topic, "contrast")) if spec.contrast else None


def _feedback(spec: GenerationSpec, topics: list[TopicScores], per_row: list[int | None],
              reference: np.ndarray | None) -> TopicFeedback | None:
    if not spec.feedback:
        return None
    if reference is None:
        raise SaealignError("the topic feedback reads the reference mean: steer through Aligner.generate, or with "
                            "feedback=False")
    known = next(t for t in per_row if t is not None)  # a row without a topic gets no push: any contrast will do
    return TopicFeedback([_topic_contrast(topics[known if t is None else t], "feedback") for t in per_row], reference)


def encode_prompt(lm: LoadedModel, i: int, prompt: str, chat: bool, max_new_tokens: int) -> tuple[str, list[int]]:
    """``(text fed to the tokenizer, its token ids)`` of prompt ``i``, checked against the context length."""
    tok: Any = lm.tokenizer
    if not isinstance(prompt, str) or not prompt.strip():
        raise SaealignError(f"prompt {i} is empty: give some text to continue")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise SaealignError(f"the tokenizer of {lm.name} has no chat template: generate with chat=False")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])  # the template holds the BOS
    else:
        text, ids = prompt, list(tok(prompt)["input_ids"])
    if not ids:
        raise SaealignError(f"prompt {i} encodes to no tokens: give some text to continue")
    config: Any = lm.model.config
    limit = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                    "max_position_embeddings", None)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise SaealignError(
            f"prompt {i} has {len(ids)} tokens and max_new_tokens is {max_new_tokens}, more than the model's "
            f"context of {limit} tokens: shorten the prompt or lower max_new_tokens"
        )
    return text, [int(t) for t in ids]


def eos_ids(lm: LoadedModel) -> set[int]:
    """The tokenizer's end-of-sequence id and the model's generation-config ones (chat models add theirs)."""
    ids: set[int] = set()
    for value in (
        getattr(lm.tokenizer, "eos_token_id", None),
        getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def resolve_topics(
    topic: TopicArg, topic_per_row: Sequence[int] | None, n: int, score: Callable[[list[str]], TopicScores],
    sae_key: str, d_sae: int,
) -> tuple[list[TopicScores], list[int | None]]:
    """The topics given (texts scored with ``score``, all checked against the SAE) and each row's topic index."""
    if topic is None:
        if topic_per_row is not None:
            raise SaealignError("topic_per_row was given without topics: pass topic=[scores, ...]")
        return [], [None] * n
    if isinstance(topic, TopicScores):
        topics = [topic]
    elif isinstance(topic, str) or (isinstance(topic, Sequence) and topic and all(isinstance(t, str) for t in topic)):
        topics = [score([topic] if isinstance(topic, str) else [str(t) for t in topic])]
    elif isinstance(topic, Sequence) and topic and all(isinstance(t, TopicScores) for t in topic):
        topics = list(topic)  # type: ignore[arg-type]
    else:
        raise SaealignError("topic must be TopicScores, a list of TopicScores, or a non-empty list of topic texts")
    if topic_per_row is None:
        if len(topics) > 1:
            raise SaealignError(f"{len(topics)} topics given: pass topic_per_row (one topic index per prompt)")
        per_row: list[int | None] = [0] * n
    else:
        per_row = [int(i) for i in topic_per_row]
        if len(per_row) != n or not all(0 <= i < len(topics) for i in per_row):  # type: ignore[operator]
            raise SaealignError(
                f"topic_per_row must hold one index in 0..{len(topics) - 1} per prompt ({n}), got {list(topic_per_row)}"
            )
    for j, t in enumerate(topics):
        t.check_compatible(sae_key, d_sae)
        if not (t.scored.any() and (t.scores > 0).any()):
            raise SaealignError(
                f"the topic scores no latent: every score of topic {j} is 0 ({t.note or 'no latent scored'}): "
                "score it against an index with more prompts, or lower min_prompts"
            )
    return topics, per_row


def make_hook(sae: SAE, spec: GenerationSpec, topics: list[TopicScores], per_row: list[int | None],
              strengths: list[float], max_act: Tensor | None,
              basis: SteeringBasis | None = None, reference: np.ndarray | None = None,
              matches: dict[int, np.ndarray] | None = None,
              units: dict[int, Tensor] | None = None) -> SteeringHook | None:
    """The hook that steers (and measures) the batch; None when nothing is edited or measured.

    ``reference`` (the contrast's reference mean) is needed by the topic feedback (``spec.feedback``), ``matches``
    (each topic's output match) by ``spec.output_match``, ``units`` (each topic's mean shift) by ``diffmean`` and (each
    topic's tuned direction) by ``spec.tune_steps``."""
    device = sae.W_enc.device
    if not topics:
        if spec.method == "sae":  # nothing to measure without a topic, but the SAE still edits
            return SteeringHook(sae, steering(spec, 1.0), torch.zeros(sae.d_sae, device=device), record=False)
        return None
    used = sorted({i for i in per_row if i is not None})
    scores = (topics[used[0]].as_tensor(device, unscored=spec.unscored) if len(used) == 1
              else torch.stack([topics[i].as_tensor(device, unscored=spec.unscored) for i in per_row]))  # type: ignore[index]
    if spec.method in ADDITIVE:
        if basis is None:
            raise SaealignError(f"{spec.method} needs the steering basis of this model and SAE (output scores)")
        direction = directions_for(sae, spec, topics, per_row, strengths, basis, matches, units)
        if scores.dim() == 1:
            scores = scores.expand(len(per_row), -1).contiguous()
        return SteeringHook(sae, steering(spec, 1.0), scores, max_act, direction=direction,
                            feedback=_feedback(spec, topics, per_row, reference))
    weights = None
    if len(set(strengths)) > 1:  # rows steered with different strengths: one weight vector per row
        if scores.dim() == 1:
            scores = scores.expand(len(per_row), -1).contiguous()
        weights = torch.stack([steering(spec, s).weights(scores[i]) for i, s in enumerate(strengths)])
    return SteeringHook(sae, steering(spec, strengths[0]), scores, max_act, weights=weights)
