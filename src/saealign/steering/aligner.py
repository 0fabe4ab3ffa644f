"""Aligned generation (M2): the library's high-level API.

::

    aligner = Aligner.default()                     # SmolLM2 + the shipped SAE + a WordNet index
    medical = aligner.topic(["The patient was given insulin.", ...])
    spec = GenerationSpec(method="swap", max_new_tokens=32)
    for g in aligner.generate(["The economy is", "My day was"], medical, spec):
        print(g.text, g.contamination)
    for item in aligner.stream("The economy is", medical, spec):
        print(item.text, end="")                    # TokenEvents, then the whole Generation

Every position (prompt and generated) is steered at the SAE's layer, except each prompt's first
position, whose residual norm the SAE never saw (see :attr:`saealign.steering.hook.SteeringHook.keep`).
A generated token's contamination is the one measured at the position that predicted it.

Sampling is reproducible per prompt: each row draws from its own generator seeded from
``(seed, prompt text)``, so a prompt gives the same text alone or in any batch (up to float
rounding of batched matmuls, which can flip a near-tie). Identical prompts with the same seed give
identical samples: pass one seed per prompt (``seed=[0, 1, 2]``) for several samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch

from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.contrast import activation_contrast, mean_activations
from saealign.reference.embed import TextEmbedder
from saealign.reference.index import ReferenceIndex
from saealign.reference.scoring import TopicScores
from saealign.residual_stream import layer_module, special_token_ids
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering import plan as planning
from saealign.steering import strength as search
from saealign.steering.decoding import Detokenizer, Sampling, decode_steps, row_generator
from saealign.steering.descriptions import (
    DESCRIBE,
    LatentDescriptions,
    description_embeddings,
    load_or_measure_descriptions,
    output_match,
)
from saealign.steering.directions import (
    DEFAULT_TEXT,
    SteeringBasis,
    chosen_latents,
    load_or_measure_basis,
    unit_decoder,
)
from saealign.steering.generation import Generation, RowRecord, TokenEvent
from saealign.steering.hook import SteeringHook
from saealign.steering.mean_shift import load_or_measure_own_mean, mean_shift, residual_mean
from saealign.steering.plan import Plan, TopicArg
from saealign.steering.slot import slot_ids, slot_position, slotted
from saealign.steering.spec import (
    ADDITIVE,
    COMPANION_MAIN_SHARE,
    DEFAULT_COMPANION_PUSH,
    LATENT_DIRECTIONS,
    PUSH_ONLY,
    GenerationSpec,
)
from saealign.steering.strength import AutoStrengthConfig, NeutralProbe, StrengthChoice, neutral_prompts
from saealign.steering.tuning import PushedLayer, load_or_tune, unit_mix

__all__ = ["Aligner", "Companion", "CompanionArg", "Generation", "TokenEvent", "TopicArg"]

CompanionArg = tuple[SAE, int] | tuple[SAE, int, float]
"""A companion layer as given to :class:`Aligner`: its SAE, the layer it reads and optionally its weight (default 1)."""


TOPIC_MEMO = 256
"""How many topics each per-topic memo of an :class:`Aligner` (output match, mean shift, companion topics, tuned
mixes) keeps."""


def _make_room(memo: dict[Any, Any], limit: int) -> None:
    """Drop a memo's oldest entry once it holds ``limit``: a server sees many topics, so memory stays bounded."""
    if len(memo) >= limit:
        memo.pop(next(iter(memo)))


class Companion(NamedTuple):
    """A companion layer of an :class:`Aligner`: pushed beside the main layer by the additive methods."""

    aligner: Aligner
    """Its own aligner: the same model, the companion's SAE and layer, no index."""
    weight: float
    """Its push as a share of ``companion_push`` × the main layer's push, in (0, 1]."""


class Aligner:
    """A model, an SAE at one of its layers, and optionally a reference index + embedder to score topics."""

    def __init__(
        self,
        lm: LoadedModel,
        sae: SAE,
        layer: int,
        index: ReferenceIndex | None = None,
        embedder: TextEmbedder | None = None,
        companions: Sequence[CompanionArg] = (),
    ) -> None:
        """``companions``: further SAEs, each with the layer it reads (and optionally a weight in (0, 1], default 1),
        pushed beside this one by the additive methods (:attr:`GenerationSpec.companion_push`); the defaults have two
        (:func:`saealign.defaults.default_companions`)."""
        from saealign.sae.formats import check_sae_fits

        check_sae_fits(sae, lm.d_model, f"layer {layer}")
        self.block = layer_module(lm.model, layer)  # checks the range
        self.layer = layer % lm.n_layers
        model_device = next(lm.model.parameters()).device
        if sae.W_enc.device != model_device:
            raise SaealignError(f"the SAE is on {sae.W_enc.device} but the model on {model_device}: move it with sae.to()")
        self.lm, self.sae, self.index, self.embedder = lm, sae, index, embedder
        self.auto_config: AutoStrengthConfig = AutoStrengthConfig()
        """How ``strength="auto"`` searches (see :mod:`saealign.steering.strength`); replace to change the budget."""
        self._probes: dict[str, NeutralProbe] = {}
        self._basis: SteeringBasis | None = None
        self._descriptions: LatentDescriptions | None = None
        self._description_embeddings: np.ndarray | None = None
        self._matches: dict[tuple[str, ...], np.ndarray] = {}
        self._topic_embeddings: dict[tuple[str, ...], np.ndarray] = {}
        self._shifts: dict[tuple[str, ...], torch.Tensor] = {}
        self._tuned: dict[tuple[Any, ...], dict[int, torch.Tensor]] = {}
        self._own_mean: np.ndarray | None = None
        self._own_texts: list[str] | None = None
        self._texts_owner: Aligner | None = None
        """Set on a companion: the main aligner, whose (the same model's) own text it reads rather than sample it again."""
        self.special_ids = special_token_ids(lm.tokenizer)
        """Token ids whose positions are never edited (see :func:`saealign.steering.decoding.decode_steps`)."""
        self.sae_key = sae_key(sae)
        self.companions: tuple[Companion, ...] = tuple(self._companion(c) for c in companions)
        """The companion layers (empty: the additive methods push at this layer alone)."""
        layers = [self.layer, *(c.aligner.layer for c in self.companions)]
        if len(set(layers)) < len(layers):
            raise SaealignError(f"the companion SAEs read layers {layers[1:]} beside this aligner's layer {self.layer}: "
                                "give each its own layer")
        self._companion_topics: dict[tuple[int, tuple[str, ...]], TopicScores] = {}
        self._companion_means: dict[tuple[int, tuple[str, ...]], np.ndarray] = {}
        """Companion layers' mean activations of topic texts, read in the main layer's pass (:meth:`_topic_means`)
        and waiting for :meth:`companion_topic` to turn them into contrasts."""
        if index is not None and (index.keys.sae != self.sae_key or index.keys.layer % lm.n_layers != self.layer):
            raise SaealignError(
                f"the index at {index.folder} was built for SAE {index.keys.sae} at layer {index.keys.layer}, not "
                f"SAE {self.sae_key} at layer {self.layer}: build an index for this SAE and layer"
            )

    def _companion(self, given: CompanionArg) -> Companion:
        if not isinstance(given, (tuple, list)) or len(given) not in (2, 3):
            raise SaealignError(f"a companion is (sae, layer) or (sae, layer, weight), got {given!r}")
        sae, layer, *rest = given
        weight = rest[0] if rest else 1.0
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight)
                                                                                     and 0 < weight <= 1):
            raise SaealignError(f"a companion's weight must lie in (0, 1], got {weight!r}: scale every companion with "
                                "companion_push instead")
        side = Aligner(self.lm, sae, layer, None, self.embedder)
        side._texts_owner = self
        return Companion(side, float(weight))

    @property
    def companion_spec(self) -> list[CompanionArg]:
        """The companions as :class:`Aligner` takes them (to build another aligner with the same layers)."""
        return [(c.aligner.sae, c.aligner.layer, c.weight) for c in self.companions]

    @classmethod
    def default(cls, layer: int | None = None, progress: bool = True) -> Aligner:
        """The embedded defaults (SmolLM2-135M-Instruct, the shipped SAE, a WordNet index, MiniLM; at the default
        layer, the shipped SAEs of :data:`saealign.defaults.COMPANION_LAYERS` as its companions)."""
        from saealign.defaults import default_companions, load_stack

        return cls(*load_stack(layer=layer, progress=progress), companions=default_companions(layer=layer))

    def topic(
        self,
        texts: Sequence[str] | str,
        summary: str = "normalized_sum",
        metric: str = "euclidean",
        min_prompts: int = 20,
    ) -> TopicScores:
        """Score every latent against the topic ``texts`` (M1; needs the index and the embedder)."""
        if self.index is None or self.embedder is None:
            raise SaealignError(
                "scoring a topic needs a reference index and an embedder: pass index= and embedder= to "
                "Aligner, or use Aligner.default()"
            )
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.with_contrast(self.index.score(texts, self.embedder, summary, metric, min_prompts))

    def with_contrast(self, topic: TopicScores) -> TopicScores:
        """``topic`` with its activation contrast filled in where it lacks one (:mod:`saealign.reference.contrast`):
        its texts' mean activations against :meth:`reference_mean`."""
        if topic.contrast is not None:
            return topic
        if not topic.topic_texts:
            raise SaealignError("these topic scores hold no topic texts to measure the activation contrast on: "
                                "re-score the topic, or steer with contrast=False and feedback=False")
        topic_mean = self._topic_means(topic.topic_texts, main=True)
        assert topic_mean is not None
        topic.contrast = activation_contrast(topic_mean, self.reference_mean())
        return topic

    def _topic_means(self, texts: Sequence[str], main: bool) -> np.ndarray | None:
        """In one forward pass over ``texts``: this layer's mean activations (returned when ``main``) and those of every
        companion layer not yet memoised for these texts (kept for :meth:`companion_topic`), so a topic's contrast at
        the main and the companion layers costs one pass, not one per layer."""
        key = tuple(texts)
        sides = [c.aligner for c in self.companions
                 if (c.aligner.layer, key) not in self._companion_means and (c.aligner.layer, key) not in self._companion_topics]
        pairs = [(self.sae, self.layer)] if main else []
        pairs += [(side.sae, side.layer) for side in sides]
        if not pairs:
            return None
        means = mean_activations(self.lm, pairs, key)
        for side, mean in zip(sides, means[len(means) - len(sides):], strict=True):
            _make_room(self._companion_means, TOPIC_MEMO * len(self.companions))
            self._companion_means[(side.layer, key)] = mean
        return means[0] if main else None

    def reference_mean(self) -> np.ndarray:
        """``[d_sae]`` what the contrast subtracts: per latent, the larger of its mean activation per token on the
        index's corpus (exact, free) and on the model's own unsteered text (:attr:`SteeringBasis.default_mean`).

        The corpus alone leaves in every feature the topic texts share with what the model writes anyway (the
        first-person, chatty register of reviews and requests is far from WordNet glosses), so the push spent
        itself on register instead of subject; the model's own text alone leaves in everything that is merely
        un-gloss-like. Without an index, the model's own text is the reference."""
        default = self.steering_basis().default_mean.astype(np.float64)
        return default if self.index is None else np.maximum(self.index.mean_activation, default)

    def generate(
        self,
        prompts: str | Sequence[str],
        topic: TopicArg = None,
        spec: GenerationSpec | None = None,
        seed: int | Sequence[int] = 0,
        topic_per_row: Sequence[int] | None = None,
        strength_per_row: Sequence[float] | None = None,
    ) -> list[Generation]:
        """Continue every prompt in one batch, steered toward ``topic`` as ``spec`` says (default: ``GenerationSpec()``).

        ``topic``: :class:`TopicScores`; topic texts (scored with :meth:`topic`); or a list of
        TopicScores with ``topic_per_row`` (one index into it per prompt) to steer each row to its own
        topic in the same batch. ``seed``: one for all rows or one per prompt. ``spec.strength="auto"``
        picks, per topic, the strongest strength within :attr:`auto_config`'s budget
        (:meth:`auto_strength`); ``strength_per_row`` gives each prompt its own number instead.
        """
        plan = self._plan([prompts] if isinstance(prompts, str) else list(prompts), topic, spec or GenerationSpec(),
                          seed, topic_per_row, strength_per_row)
        records = self._records(plan)
        for row, event, n_changed, reason in self._events(plan):
            records[row].add(event, n_changed, reason)
        return [self._finish(r, plan.spec) for r in records]

    def stream(
        self, prompt: str, topic: TopicArg = None, spec: GenerationSpec | None = None, seed: int = 0
    ) -> Iterator[TokenEvent | Generation]:
        """Yield one prompt's tokens as they are produced, then its :class:`Generation` (what :meth:`generate` returns).

        Options are checked on the call, before the first token. Nothing stays attached to the model
        between tokens, so a stream may be abandoned at any point.
        """
        plan = self._plan([prompt], topic, spec or GenerationSpec(), seed, None, None)
        return self._stream(plan)

    def auto_strength(self, topic: TopicScores, spec: GenerationSpec | None = None) -> StrengthChoice:
        """The strongest strength of ``spec``'s method within the fluency budget for ``topic`` (searched once,
        then cached in ``topic.extra["auto_strength"]``, which :meth:`TopicScores.save` keeps).
        See :mod:`saealign.steering.strength`."""
        spec = self.resolve(spec or GenerationSpec())
        topic.check_compatible(self.sae_key, self.sae.d_sae)
        key = search.cache_key(self, spec, self.auto_config)
        cached = topic.extra.setdefault("auto_strength", {})
        if key not in cached:
            cached[key] = search.choose_strength(self, topic, spec, self.auto_config).to_json()
        return StrengthChoice.from_json(cached[key])

    def neutral_probe(self, cfg: AutoStrengthConfig) -> NeutralProbe:
        """The unsteered side of the search (topic-independent: measured once per configuration)."""
        if cfg.key() not in self._probes:
            self._probes[cfg.key()] = NeutralProbe(self, cfg)
        return self._probes[cfg.key()]

    def steering_basis(self) -> SteeringBasis:
        """Output scores and residual norm for the additive methods: shipped for the defaults, else measured once
        (a minute or two on a CPU) and cached on disk. See :mod:`saealign.steering.directions`."""
        if self._basis is None:
            self._basis = load_or_measure_basis(self.lm, self.sae, self.layer, neutral_prompts(4), self.default_texts)
        return self._basis

    def latent_descriptions(self) -> LatentDescriptions:
        """What each latent makes the model say (:mod:`saealign.steering.descriptions`): shipped for the defaults,
        else measured once (a minute or two on a CPU) and cached on disk."""
        if self._descriptions is None:
            self._descriptions = load_or_measure_descriptions(
                self.lm, self.sae, self.layer, neutral_prompts(int(DESCRIBE["prompts"])),
                self.steering_basis().residual_norm)
        return self._descriptions

    def output_match(self, topic: TopicScores) -> np.ndarray:
        """``[d_sae]`` how near the words each latent makes the model say are to ``topic``'s texts
        (:func:`saealign.steering.descriptions.output_match`; remembered per topic texts)."""
        if self.embedder is None:
            raise SaealignError("the output match embeds the topic texts and the latents' descriptions: pass "
                                "embedder= to Aligner, or steer with output_match=False")
        if not topic.topic_texts:
            raise SaealignError("these topic scores hold no topic texts to read the output match from: re-score the "
                                "topic, or steer with output_match=False")
        key = tuple(topic.topic_texts)
        if key not in self._matches:
            if self._description_embeddings is None:
                self._description_embeddings = description_embeddings(self.latent_descriptions(), self.embedder)
            _make_room(self._matches, TOPIC_MEMO)
            self._matches[key] = output_match(self._description_embeddings, self.topic_embeddings(key))
        return self._matches[key]

    def topic_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, dim]`` the embedder's unit vectors of a topic's ``texts``, remembered per texts (read-only).

        The output match at every pushed layer and the strength search all read the same topic texts; embedding
        them once instead of at each was about 0.8 s of ``strength="auto"``'s time per topic on a CPU. A companion
        layer reads its main aligner's memo."""
        if self._texts_owner is not None:
            return self._texts_owner.topic_embeddings(texts)
        if self.embedder is None:
            raise SaealignError("embedding the topic texts needs an embedder: pass embedder= to Aligner")
        key = tuple(texts)
        if key not in self._topic_embeddings:
            _make_room(self._topic_embeddings, TOPIC_MEMO)
            vectors = np.asarray(self.embedder.embed(list(key)), dtype=np.float32)
            vectors.setflags(write=False)
            self._topic_embeddings[key] = vectors
        return self._topic_embeddings[key]

    def mean_shift(self, topic: TopicScores) -> torch.Tensor:
        """``[d_model]`` the unit direction ``diffmean`` pushes ``topic`` along at this aligner's layer: its texts' mean
        residual minus the model's own text's (:mod:`saealign.steering.mean_shift`; remembered per topic texts)."""
        if not topic.topic_texts:
            raise SaealignError("these topic scores hold no topic texts, and diffmean pushes along their mean residual: "
                                "re-score the topic from its texts, or steer with add")
        key = tuple(topic.topic_texts)
        if key not in self._shifts:
            if self._own_mean is None:
                self._own_mean = load_or_measure_own_mean(self.lm, self.layer, neutral_prompts(16), DEFAULT_TEXT,
                                                          self.default_texts)
            _make_room(self._shifts, TOPIC_MEMO)
            self._shifts[key] = mean_shift(residual_mean(self.lm, self.layer, list(key)), self._own_mean)
        return self._shifts[key]

    def tuned_directions(self, topic: TopicScores, strength: float, spec: GenerationSpec) -> dict[int, torch.Tensor]:
        """Per pushed layer (this aligner's, then each companion's), the unit direction of ``topic``'s latent mix tuned
        with ``spec.tune_steps`` steps while this layer is pushed at ``strength`` (the main layer's share) and each
        companion as :meth:`_companion_hooks` pushes it (:mod:`saealign.steering.tuning`; remembered per topic texts
        and strength, cached on disk). ``topic`` carries its contrast where ``spec.contrast`` is on."""
        if not topic.topic_texts:
            raise SaealignError("these topic scores hold no topic texts to tune the push on: re-score the topic from "
                                "its texts, or steer with tune_steps=0")
        spec = self.resolve(spec)
        push = spec.companion_push or 0.0
        sides = [(self, topic, strength)] + [(c.aligner, self.companion_topic(topic, c.aligner), strength * push * c.weight)
                                             for c in self.companions if push > 0]
        memo = (tuple(topic.topic_texts), round(strength, 9), spec.tune_steps, push, spec.n_latents,
                spec.output_scores, spec.contrast, spec.output_match)
        if memo not in self._tuned:
            layers, chosen = [], []
            for side, side_topic, side_strength in sides:
                basis = side.steering_basis()
                match = side.output_match(side_topic) if spec.output_match else None
                values, idx = chosen_latents(side_topic.as_tensor(unscored="drop"), spec.n_latents,
                                             *planning.latent_factors(spec, side_topic, basis, match))
                layers.append(PushedLayer(side.block, unit_decoder(side.sae).cpu()[idx], values,
                                          side_strength * basis.residual_norm))
                chosen.append({"basis": basis.key, "latents": idx.tolist()})
            weights = load_or_tune(self.lm.model, layers, self.lm.tokenizer, self.special_ids, list(memo[0]),
                                   int(spec.tune_steps or 0), {"model": self.lm.key, "pushed": chosen}, progress=True)
            _make_room(self._tuned, TOPIC_MEMO)
            self._tuned[memo] = {side.layer: unit_mix(layer.decoder, w)
                                 for (side, _, _), layer, w in zip(sides, layers, weights, strict=True)}
        return self._tuned[memo]

    def resolve(self, spec: GenerationSpec) -> GenerationSpec:
        """``spec`` with ``companion_push`` resolved for this aligner (None: the default where it has companion
        layers, else 0); one error line if it asks for companions this aligner lacks."""
        if spec.companion_push is None:
            default = DEFAULT_COMPANION_PUSH if self.companions and spec.method in ADDITIVE else 0.0
            return replace(spec, companion_push=default)
        if spec.companion_push > 0 and spec.method in ADDITIVE and not self.companions:
            raise SaealignError("companion_push needs an aligner with companion layers (Aligner(..., companions=[(sae, "
                                "layer)]); the defaults have them): steer with companion_push=0")
        return spec

    def companion_topic(self, topic: TopicScores, side: Aligner) -> TopicScores:
        """``topic`` for the companion ``side``'s SAE: every latent weighs 1 as its M1 score (a companion has no
        index), times its activation contrast against the model's own text, output score and output match
        (remembered per companion and topic texts)."""
        if all(c.aligner is not side for c in self.companions):
            raise SaealignError("that aligner is not a companion layer of this one")
        if not topic.topic_texts:
            raise SaealignError("these topic scores hold no topic texts to steer the companion layers with: re-score "
                                "the topic, or steer with companion_push=0")
        key = (side.layer, tuple(topic.topic_texts))
        if key not in self._companion_topics:
            d = side.sae.d_sae
            plain = TopicScores(np.ones(d, np.float32), np.full(d, np.nan), np.zeros(d, np.int64), np.ones(d, bool),
                                list(key[1]), sae_key=side.sae_key,
                                note="companion layer: weighed by contrast, output score and output match alone")
            if key not in self._companion_means:
                self._topic_means(key[1], main=False)
            plain.contrast = activation_contrast(self._companion_means.pop(key), side.reference_mean())
            _make_room(self._companion_topics, TOPIC_MEMO * len(self.companions))
            self._companion_topics[key] = plain
        return self._companion_topics[key]

    def _companion_hooks(self, spec: GenerationSpec, topics: list[TopicScores], per_row: list[int | None],
                         strengths: list[float], tuned: dict[int, dict[int, torch.Tensor]] | None = None
                         ) -> tuple[tuple[SteeringHook, torch.nn.Module], ...]:
        """The companion layers' pushes for the batch (empty when they are off), ``strengths`` being the main
        layer's: each companion gets ``strength × companion_push × its weight`` (along its tuned direction per
        topic index where ``tuned`` holds one, :meth:`_tuned_units`)."""
        push = spec.companion_push or 0.0
        if spec.method not in ADDITIVE or push == 0 or not topics:
            return ()
        side_spec = replace(spec, method=spec.method if spec.method in PUSH_ONLY else "add")  # a companion only pushes
        hooks = []
        for c in self.companions:
            hook = c.aligner._hook(side_spec, [self.companion_topic(t, c.aligner) for t in topics], per_row,
                                   [s * push * c.weight for s in strengths], None,
                                   None if tuned is None else {i: u[c.aligner.layer] for i, u in tuned.items()})
            assert hook is not None
            hook.record = False
            hooks.append((hook, c.aligner.block))
        return tuple(hooks)

    def _hook(self, spec: GenerationSpec, topics: list[TopicScores], per_row: list[int | None],
              strengths: list[float], max_act: torch.Tensor | None,
              tuned: dict[int, torch.Tensor] | None = None) -> SteeringHook | None:
        """:func:`planning.make_hook` with what this aligner's SAE needs for ``spec``: the steering basis, the
        feedback's reference mean and each used topic's output match (the main layer's and the companion's), or
        its direction where it is given: the mean shift (``diffmean``), the tuned mix (``tuned``, per topic index)."""
        additive = spec.method in ADDITIVE and bool(topics)
        basis = self.steering_basis() if additive else None
        reference = self.reference_mean() if additive and spec.feedback else None
        used = sorted({j for j in per_row if j is not None})
        latents = additive and spec.method in LATENT_DIRECTIONS and tuned is None
        matches = {i: self.output_match(topics[i]) for i in used} if latents and spec.output_match else None
        units = tuned
        if additive and spec.method not in LATENT_DIRECTIONS:
            units = {i: self.mean_shift(topics[i]) for i in used}
        return planning.make_hook(self.sae, spec, topics, per_row, strengths, max_act, basis, reference, matches,
                                  units)

    def _tuned_units(self, spec: GenerationSpec, topics: list[TopicScores], per_row: list[int | None],
                     strengths: list[float]) -> dict[int, dict[int, torch.Tensor]] | None:
        """Per used topic index, its tuned unit direction per pushed layer (:meth:`tuned_directions`) at its rows'
        main-layer strength; None when ``spec`` tunes nothing."""
        if not spec.tune_steps or spec.method != "add" or not topics:
            return None
        tuned = {}
        for i in sorted({j for j in per_row if j is not None}):
            chosen = {s for s, t in zip(strengths, per_row, strict=True) if t == i}
            if len(chosen) > 1:
                raise SaealignError("tune_steps tunes one push per topic: give the rows of a topic one strength, or "
                                    "steer with tune_steps=0")
            strength = chosen.pop()
            if strength == 0:  # no push (auto found nothing to steer by): no direction to tune
                tuned[i] = {a.layer: torch.zeros(a.sae.d_in) for a in (self, *(c.aligner for c in self.companions))}
            else:
                tuned[i] = self.tuned_directions(topics[i], strength, spec)
        return tuned

    def default_texts(self) -> list[str]:
        """The model's own unsteered text: every neutral prompt continued with each of :data:`DEFAULT_TEXT`'s seeds
        (prompt + continuation), what :attr:`SteeringBasis.default_mean` is measured on. Sampled once per model (the
        seeds fix it), shared with the companion layers."""
        if self._texts_owner is not None:
            return self._texts_owner.default_texts()
        if self._own_texts is None:
            prompts = neutral_prompts(16)
            spec = GenerationSpec("none", max_new_tokens=DEFAULT_TEXT["max_new_tokens"], top_k=DEFAULT_TEXT["top_k"])
            seeds = [s for s in range(DEFAULT_TEXT["seeds"]) for _ in prompts]
            gens = self.generate(prompts * DEFAULT_TEXT["seeds"], None, spec, seed=seeds)
            self._own_texts = [p + g.text for p, g in zip(prompts * DEFAULT_TEXT["seeds"], gens, strict=True)]
        return list(self._own_texts)

    def eos_ids(self) -> set[int]:
        """Token ids that end a row (see :func:`saealign.steering.plan.eos_ids`)."""
        return planning.eos_ids(self.lm)

    # -- internals -------------------------------------------------------------------------------
    def _plan(self, prompts: list[str], topic: TopicArg, spec: GenerationSpec, seed: int | Sequence[int],
              topic_per_row: Sequence[int] | None, strength_per_row: Sequence[float] | None) -> Plan:
        if not prompts:
            raise SaealignError("no prompts given: pass one prompt or a list of them")
        spec = self.resolve(spec)
        seeds = planning.seeds_for(seed, len(prompts))
        strengths = planning.row_strengths(spec, strength_per_row, len(prompts))
        planning.steering(spec, 1.0)  # the edit itself is known: fail on it before any work
        encoded = [planning.encode_prompt(self.lm, i, p, spec.chat, spec.max_new_tokens) for i, p in enumerate(prompts)]
        texts, rows = [t for t, _ in encoded], [ids for _, ids in encoded]
        topics, per_row = planning.resolve_topics(topic, topic_per_row, len(prompts), self.topic, self.sae_key,
                                                  self.sae.d_sae)
        if (spec.method in LATENT_DIRECTIONS and spec.contrast) or (spec.method in ADDITIVE and spec.feedback):
            topics = [self.with_contrast(t) for t in topics]
        if spec.needs_topic and not topics:
            raise SaealignError(f"method {spec.method!r} needs a topic: pass topic= (scores or topic texts)")
        if spec.method == "clamp" and self.index is None:
            raise SaealignError("clamp needs each latent's max activation from a reference index: pass index=")
        if strengths is None:  # auto: searched once per topic, rows without a topic ignore it
            chosen = {i: self.auto_strength(topics[i], spec).strength for i in sorted({j for j in per_row if j is not None})}
            strengths = [chosen[i] if i is not None else 1.0 for i in per_row]
        max_act = None
        if spec.method == "clamp" and topics:
            assert self.index is not None
            max_act = torch.as_tensor(self.index.latent_max_act, device=self.sae.W_enc.device)
        main = strengths
        if spec.method in ADDITIVE and spec.companion_push and topics:  # the layers share the strength
            main = [s * COMPANION_MAIN_SHARE for s in strengths]
        tuned = self._tuned_units(spec, topics, per_row, main)
        hook = self._hook(spec, topics, per_row, main, max_act,
                          None if tuned is None else {i: u[self.layer] for i, u in tuned.items()})
        companions = self._companion_hooks(spec, topics, per_row, main, tuned)
        slots: list[int | None] = []
        if hook is not None and spec.method in ADDITIVE and spec.slot and topics:
            texts, rows, slots = self._slot(texts, rows, prompts, spec, per_row, strengths,
                                            [hook, *(h for h, _ in companions)])
        # each row's stream is seeded from the text the model reads (a slotted row's template included)
        generators = [row_generator(s, t) for s, t in zip(seeds, texts, strict=True)]
        return Plan(prompts, rows, generators, seeds, per_row, hook, strengths, spec, companions, tuple(slots))

    def _slot(self, texts: list[str], rows: list[list[int]], prompts: list[str], spec: GenerationSpec,
              per_row: list[int | None], strengths: list[float], hooks: list[SteeringHook]
              ) -> tuple[list[str], list[list[int]], list[int | None]]:
        """The concept slot (:mod:`saealign.steering.slot`): each steered row (a topic, a strength above 0) re-encoded
        after the slot template, the index of its placeholder, and on every pushed layer's hook the vectors the
        placeholder takes: the layer's push × ``slot_push / strength`` (so the slot is pushed ``slot_push`` in strength
        units, in the same shares between layers as the push)."""
        word = slot_ids(self.lm.tokenizer)
        slots: list[int | None] = []
        gains = []
        for i, (prompt, t, s) in enumerate(zip(prompts, per_row, strengths, strict=True)):
            if t is None or s <= 0:
                slots.append(None)
                gains.append(0.0)
                continue
            try:
                texts[i], rows[i] = planning.encode_prompt(self.lm, i, slotted(prompt), spec.chat, spec.max_new_tokens)
            except SaealignError as e:  # the context is too short for the template too: say that it counts
                raise SaealignError(f"{e} (the concept slot's template counts: or steer with slot_push=0)") from None
            slots.append(slot_position(rows[i], word))
            gains.append(spec.slot / s)
        gain = torch.tensor(gains).unsqueeze(1)
        for h in hooks:
            assert h.direction is not None and h.direction.dim() == 2  # directions_for gives one row per prompt
            h.slot_vectors = h.direction * gain.to(h.direction.device, h.direction.dtype)
        return texts, rows, slots

    def _records(self, plan: Plan) -> list[RowRecord]:
        measured = plan.hook is not None and plan.hook.record
        return [RowRecord(p, len(ids), seed, strength, t, measured) for p, ids, seed, strength, t
                in zip(plan.prompts, plan.rows, plan.seeds, plan.strengths, plan.topic_index, strict=True)]

    def _finish(self, record: RowRecord, spec: GenerationSpec) -> Generation:
        text = self.lm.tokenizer.decode(record.ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        return record.generation(text, spec.method, spec.mode)

    def _stream(self, plan: Plan) -> Iterator[TokenEvent | Generation]:
        (record,) = self._records(plan)
        for _, event, n_changed, reason in self._events(plan):
            record.add(event, n_changed, reason)
            yield event
        yield self._finish(record, plan.spec)

    def _events(self, plan: Plan) -> Iterator[tuple[int, TokenEvent, int, str | None]]:
        """``(row, event, n_changed, finish reason or None)`` for each row's token of each step, in row order."""
        tok = self.lm.tokenizer
        eos = self.eos_ids()
        pad = getattr(tok, "pad_token_id", None)
        pad = pad if pad is not None else (min(eos) if eos else 0)
        detok = [Detokenizer(tok) for _ in plan.rows]
        steps = decode_steps(self.lm.model, plan.rows, Sampling.of(plan.spec), plan.generators, pad, eos, plan.hook,
                             self.block, plan.spec.steer_prompt, self.special_ids, plan.spec.boost, plan.companions,
                             plan.slots)
        for step in steps:
            for row in step.active.nonzero().flatten().tolist():
                token = int(step.token_ids[row])
                last = bool(step.finished[row])
                c = None if step.contamination is None else float(step.contamination[row])
                n_changed = 0 if step.n_changed is None else int(step.n_changed[row])
                reason = ("eos" if token in eos else "length") if last else None
                yield row, TokenEvent(detok[row].push(token, last), token, c, step.step), n_changed, reason
