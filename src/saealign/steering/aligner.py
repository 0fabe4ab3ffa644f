"""Aligned generation (M2): the library's high-level API.

::

    aligner = Aligner.default()                     # SmolLM2 + the shipped SAE + a WordNet index
    medical = aligner.topic(["The patient was given insulin.", ...])
    for g in aligner.generate(["The economy is", "My day was"], topic=medical, method="swap"):
        print(g.text, g.contamination)
    for event in aligner.stream("The economy is", topic=medical):
        print(event.text, end="")

Every position (prompt and generated) is steered at the SAE's layer, except each prompt's first
position, whose residual norm the SAE never saw (see :attr:`saealign.steering.edits.SteeringHook.keep`).
A generated token's contamination is the one measured at the position that predicted it.

Sampling is reproducible per prompt: each row draws from its own generator seeded from
``(seed, prompt text)``, so a prompt gives the same text alone or in any batch (up to float
rounding of batched matmuls, which can flip a near-tie). Identical prompts with the same seed give
identical samples: pass one seed per prompt (``seed=[0, 1, 2]``) for several samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from saealign.errors import SaealignError
from saealign.models import LoadedModel, layer_module
from saealign.reference.embed import TextEmbedder
from saealign.reference.index import ReferenceIndex
from saealign.reference.scoring import TopicScores
from saealign.sae.autoencoder import SAE, sae_key
from saealign.steering.decoding import Detokenizer, Sampling, decode_steps, row_generator
from saealign.steering.edits import Steering, SteeringHook
from saealign.steering.strength import (
    AUTO,
    AutoStrengthConfig,
    NeutralProbe,
    StrengthChoice,
    cache_key,
    choose_strength,
)

TopicSpec = TopicScores | Sequence[TopicScores] | Sequence[str] | str | None
"""A topic argument: scores, several scores (with ``topic_per_row``), topic texts, or None."""


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


@dataclass(frozen=True)
class _Plan:
    """Everything one generation call needs, resolved and checked."""

    rows: list[list[int]]
    generators: list[torch.Generator]
    seeds: list[int]
    topic_index: list[int | None]
    hook: SteeringHook | None
    strengths: list[float]
    """The strength each row was steered with (``auto`` resolved per topic)."""
    steer_prompt: bool = True


class Aligner:
    """A model, an SAE at one of its layers, and optionally a reference index + embedder to score topics."""

    def __init__(
        self,
        lm: LoadedModel,
        sae: SAE,
        layer: int,
        index: ReferenceIndex | None = None,
        embedder: TextEmbedder | None = None,
    ) -> None:
        from saealign.sae.formats import check_sae_fits

        check_sae_fits(sae, lm.d_model, f"layer {layer}")
        self.block = layer_module(lm.model, layer)  # checks the range
        self.layer = layer % lm.n_layers
        model_device = next(lm.model.parameters()).device
        if sae.W_enc.device != model_device:
            raise SaealignError(f"the SAE is on {sae.W_enc.device} but the model on {model_device}: move it with sae.to()")
        self.lm, self.sae, self.index, self.embedder = lm, sae, index, embedder
        self.auto_config = AutoStrengthConfig()
        """How ``strength="auto"`` searches (see :mod:`saealign.steering.strength`); replace to change the budget."""
        self._probes: dict[str, NeutralProbe] = {}
        self.sae_key = sae_key(sae)
        if index is not None and (index.keys.sae != self.sae_key or index.keys.layer % lm.n_layers != self.layer):
            raise SaealignError(
                f"the index at {index.folder} was built for SAE {index.keys.sae} at layer {index.keys.layer}, not "
                f"SAE {self.sae_key} at layer {self.layer}: build an index for this SAE and layer"
            )

    @classmethod
    def default(cls, layer: int | None = None, progress: bool = True) -> Aligner:
        """The embedded defaults (SmolLM2-135M-Instruct, the shipped SAE, a WordNet index, MiniLM)."""
        from saealign.defaults import load_defaults

        return cls(*load_defaults(layer, progress))

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
        return self.index.score(texts, self.embedder, summary, metric, min_prompts)

    def generate(
        self,
        prompts: str | Sequence[str],
        topic: TopicSpec = None,
        method: str = "swap",
        mode: str = "error",
        strength: float | str | Sequence[float] = AUTO,
        max_new_tokens: int = 64,
        top_k: int = 5,
        temperature: float = 1.0,
        seed: int | Sequence[int] = 0,
        greedy: bool = False,
        chat: bool = False,
        topic_per_row: Sequence[int] | None = None,
        clamp_n: int = 5,
        clamp_multiplier: float = 10.0,
        steer_prompt: bool = True,
    ) -> list[Generation]:
        """Continue every prompt in one batch, steered by ``method``/``mode`` towards ``topic``.

        ``topic``: :class:`TopicScores`; topic texts (scored with :meth:`topic`); or a list of
        TopicScores with ``topic_per_row`` (one index into it per prompt) to steer each row to its own
        topic in the same batch. ``seed``: one for all rows or one per prompt. ``chat``: wrap each
        prompt in the tokenizer's chat template. Methods and modes: see :mod:`saealign.steering.edits`.
        ``strength``: Swap/Weight use ``scores ** strength`` (1 = the paper); ``"auto"`` picks, per topic,
        the strongest that keeps perplexity within :attr:`auto_config`'s budget (:meth:`auto_strength`);
        a list gives one number per prompt.
        ``steer_prompt=False`` edits only the positions that predict new tokens (the last prompt position
        and the generated ones), leaving the prompt's own representation as the model built it.
        """
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        sampling = Sampling(max_new_tokens, top_k, temperature, greedy)
        plan = self._plan(prompt_list, topic, topic_per_row, seed, chat, sampling,
                          (method, mode, clamp_n, clamp_multiplier, strength, steer_prompt))
        n = len(prompt_list)
        ids: list[list[int]] = [[] for _ in range(n)]
        pieces: list[list[str]] = [[] for _ in range(n)]
        contam: list[list[float]] = [[] for _ in range(n)]
        changed: list[list[int]] = [[] for _ in range(n)]
        finish = ["length"] * n
        for row, event, n_changed, reason in self._events(plan, sampling):
            ids[row].append(event.token_id)
            pieces[row].append(event.text)
            changed[row].append(n_changed)
            if event.contamination is not None:
                contam[row].append(event.contamination)
            finish[row] = reason or finish[row]
        measured = plan.hook is not None and plan.hook.record
        out = []
        for i in range(n):
            out.append(Generation(
                prompt=prompt_list[i], method=method, mode=mode, strength=plan.strengths[i],
                text=self.lm.tokenizer.decode(ids[i], skip_special_tokens=True),  # type: ignore[attr-defined]
                tokens=pieces[i], token_ids=ids[i],
                token_contamination=contam[i] if measured else None,
                contamination=sum(contam[i]) / len(contam[i]) if measured and contam[i] else None,
                n_changed=changed[i], topic_index=plan.topic_index[i], finish_reason=finish[i],
                seed=plan.seeds[i],
            ))  # fmt: skip
        return out

    def stream(
        self,
        prompt: str,
        topic: TopicSpec = None,
        method: str = "swap",
        mode: str = "error",
        strength: float | str = AUTO,
        max_new_tokens: int = 64,
        top_k: int = 5,
        temperature: float = 1.0,
        seed: int = 0,
        greedy: bool = False,
        chat: bool = False,
        clamp_n: int = 5,
        clamp_multiplier: float = 10.0,
        steer_prompt: bool = True,
    ) -> Iterator[TokenEvent]:
        """Yield the tokens of one prompt's continuation as they are produced (same options as :meth:`generate`).

        Options are checked on the call, before the first token. Nothing stays attached to the model
        between tokens, so a stream may be abandoned at any point.
        """
        sampling = Sampling(max_new_tokens, top_k, temperature, greedy)
        plan = self._plan([prompt], topic, None, seed, chat, sampling,
                          (method, mode, clamp_n, clamp_multiplier, strength, steer_prompt))
        return (event for _, event, _, _ in self._events(plan, sampling))

    # -- internals -------------------------------------------------------------------------------
    def _events(self, plan: _Plan, sampling: Sampling) -> Iterator[tuple[int, TokenEvent, int, str | None]]:
        """``(row, event, n_changed, finish reason or None)`` for each row's token of each step, in row order."""
        tok = self.lm.tokenizer
        eos = self.eos_ids()
        pad = getattr(tok, "pad_token_id", None)
        pad = pad if pad is not None else (min(eos) if eos else 0)
        detok = [Detokenizer(tok) for _ in plan.rows]
        steps = decode_steps(self.lm.model, plan.rows, sampling, plan.generators, pad, eos, plan.hook, self.block,
                             plan.steer_prompt)
        for step in steps:
            for row in step.active.nonzero().flatten().tolist():
                token = int(step.token_ids[row])
                last = bool(step.finished[row])
                c = None if step.contamination is None else float(step.contamination[row])
                n_changed = 0 if step.n_changed is None else int(step.n_changed[row])
                reason = ("eos" if token in eos else "length") if last else None
                yield row, TokenEvent(detok[row].push(token, last), token, c, step.step), n_changed, reason

    def eos_ids(self) -> set[int]:
        """The tokenizer's end-of-sequence id and the model's generation-config ones (chat models add theirs)."""
        ids: set[int] = set()
        for value in (
            getattr(self.lm.tokenizer, "eos_token_id", None),
            getattr(getattr(self.lm.model, "generation_config", None), "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def _plan(
        self,
        prompts: list[str],
        topic: TopicSpec,
        topic_per_row: Sequence[int] | None,
        seed: int | Sequence[int],
        chat: bool,
        sampling: Sampling,
        how: tuple[str, str, int, float, float | str | Sequence[float], bool],
    ) -> _Plan:
        if not prompts:
            raise SaealignError("no prompts given: pass one prompt or a list of them")
        seeds = [seed] * len(prompts) if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise SaealignError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed, or one per prompt")
        method, mode, clamp_n, clamp_multiplier, strength, steer_prompt = how
        if isinstance(strength, str) and strength != AUTO:
            raise SaealignError(f"strength must be a number or 'auto', got {strength!r}")
        if isinstance(strength, Sequence) and not isinstance(strength, str):
            if len(strength) != len(prompts):
                raise SaealignError(f"{len(strength)} strengths for {len(prompts)} prompts: give one, or one per prompt")
            for s in strength:
                Steering(method, mode, strength=float(s))
        # checks method, mode and a numeric strength before any work (auto resolves to numbers below)
        steering = Steering(method, mode, clamp_n, clamp_multiplier,
                            float(strength) if isinstance(strength, (int, float)) else 1.0)
        texts, rows = zip(*(self._encode(i, p, chat, sampling.max_new_tokens) for i, p in enumerate(prompts)), strict=True)
        topics, per_row = self._topics(topic, topic_per_row, len(prompts))
        if steering.method in ("clamp", "swap", "weight") and not topics:
            raise SaealignError(f"method {steering.method!r} needs a topic: pass topic= (scores or topic texts)")
        strengths = self._strengths(topics, per_row, method, mode, strength, steer_prompt)
        hook = None
        device = self.sae.W_enc.device
        if topics:
            used = sorted({i for i in per_row if i is not None})
            scores = (topics[used[0]].as_tensor(device) if len(used) == 1
                      else torch.stack([topics[i].as_tensor(device) for i in per_row]))  # type: ignore[index]
            max_act = weights = None
            if steering.method == "clamp":
                if self.index is None:
                    raise SaealignError("clamp needs each latent's max activation from a reference index: pass index=")
                max_act = torch.as_tensor(self.index.latent_max_act, device=device)
            if len(set(strengths)) == 1:
                steering = Steering(method, mode, clamp_n, clamp_multiplier, strengths[0])
            else:  # rows steered with different strengths: one weight vector per row
                if scores.dim() == 1:
                    scores = scores.expand(len(prompts), -1).contiguous()
                weights = torch.stack([Steering(method, mode, strength=st).weights(scores[i])
                                       for i, st in enumerate(strengths)])
            hook = SteeringHook(self.sae, steering, scores, max_act, weights=weights)
        elif steering.method == "sae":  # nothing to measure without a topic, but the SAE still edits
            hook = SteeringHook(self.sae, steering, torch.zeros(self.sae.d_sae, device=device), record=False)
        generators = [row_generator(s, t) for s, t in zip(seeds, texts, strict=True)]
        return _Plan(list(rows), generators, seeds, per_row, hook, strengths, steer_prompt)

    def _strengths(self, topics: list[TopicScores], per_row: list[int | None], method: str, mode: str,
                   strength: float | str | Sequence[float], steer_prompt: bool = True) -> list[float]:
        """Each row's numeric strength: ``auto`` resolved per topic for Swap/Weight, 1.0 where unused."""
        if method not in ("swap", "weight"):
            return [float(strength) if isinstance(strength, (int, float)) else 1.0] * len(per_row)
        if isinstance(strength, (int, float)):
            return [float(strength)] * len(per_row)
        if not isinstance(strength, str):
            return [float(s) for s in strength]
        chosen = {i: self.auto_strength(topics[i], method, mode, steer_prompt).strength
                  for i in sorted({j for j in per_row if j is not None})}
        return [chosen[i] if i is not None else 1.0 for i in per_row]

    def auto_strength(self, topic: TopicScores, method: str = "swap", mode: str = "error",
                      steer_prompt: bool = True) -> StrengthChoice:
        """The strongest Swap/Weight strength within the fluency budget for ``topic`` (searched once, then cached
        in ``topic.extra["auto_strength"]``, which :meth:`TopicScores.save` keeps). See :mod:`saealign.steering.strength`."""
        Steering(method, mode)  # a clear error for an unknown method or mode before any search
        topic.check_compatible(self.sae_key, self.sae.d_sae)
        key = cache_key(self, method, mode, self.auto_config) + ("" if steer_prompt else "-generated-only")
        cached = topic.extra.setdefault("auto_strength", {})
        if key not in cached:
            cached[key] = choose_strength(self, topic, method, mode, self.auto_config, steer_prompt).to_json()
        return StrengthChoice.from_json(cached[key])

    def neutral_probe(self, cfg: AutoStrengthConfig) -> NeutralProbe:
        """The unsteered side of the search (topic-independent: measured once per configuration)."""
        if cfg.key() not in self._probes:
            self._probes[cfg.key()] = NeutralProbe(self, cfg)
        return self._probes[cfg.key()]

    def _encode(self, i: int, prompt: str, chat: bool, max_new_tokens: int) -> tuple[str, list[int]]:
        """``(text fed to the tokenizer, its token ids)`` of prompt ``i``, checked against the context length."""
        tok: Any = self.lm.tokenizer
        if not isinstance(prompt, str) or not prompt.strip():
            raise SaealignError(f"prompt {i} is empty: give some text to continue")
        if chat:
            if not getattr(tok, "chat_template", None):
                raise SaealignError(f"the tokenizer of {self.lm.name} has no chat template: generate with chat=False")
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])  # the template holds the BOS
        else:
            text, ids = prompt, list(tok(prompt)["input_ids"])
        if not ids:
            raise SaealignError(f"prompt {i} encodes to no tokens: give some text to continue")
        config: Any = self.lm.model.config
        limit = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                        "max_position_embeddings", None)
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise SaealignError(
                f"prompt {i} has {len(ids)} tokens and max_new_tokens is {max_new_tokens}, more than the model's "
                f"context of {limit} tokens: shorten the prompt or lower max_new_tokens"
            )
        return text, [int(t) for t in ids]

    def _topics(
        self, topic: TopicSpec, topic_per_row: Sequence[int] | None, n: int
    ) -> tuple[list[TopicScores], list[int | None]]:
        """The topics given (checked against the SAE) and the topic index of each row."""
        if topic is None:
            if topic_per_row is not None:
                raise SaealignError("topic_per_row was given without topics: pass topic=[scores, ...]")
            return [], [None] * n
        if isinstance(topic, TopicScores):
            topics = [topic]
        elif isinstance(topic, str) or (
            isinstance(topic, Sequence) and topic and all(isinstance(t, str) for t in topic)
        ):
            topics = [self.topic(topic)]  # type: ignore[arg-type]
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
            t.check_compatible(self.sae_key, self.sae.d_sae)
            if not (t.scored.any() and (t.scores > 0).any()):
                raise SaealignError(
                    f"the topic scores no latent: every score of topic {j} is 0 ({t.note or 'no latent scored'}): "
                    "score it against an index with more prompts, or lower min_prompts"
                )
        return topics, per_row
