"""What the experiments of one evaluation run share: the loaded stacks, the judge, fine-tuned models, a classifier.

A :class:`Workbench` is built once (by ``saealign eval ...``, or by a library user) and passed to every
experiment function, which asks it for what it needs; each thing is loaded or trained on first use and
kept on the workbench, so ``eval all`` loads the model of each layer once, fine-tunes each baseline once
and trains one acceptability classifier. Where things come from is a :class:`Loader`: the embedded
defaults (:class:`DefaultLoader`) or anything else with the same three methods (tests use tiny models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from saealign.cache import hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import TextEmbedder
from saealign.reference.index import ReferenceIndex
from saealign.steering.aligner import Aligner

if TYPE_CHECKING:
    from saealign.evaluate.finetune import FineTuned


class Loader(Protocol):
    """Where a workbench gets its models (each call may load: the workbench keeps what it gets)."""

    def aligner(self, layer: int) -> Aligner:
        """The steering stack at ``layer``: model, SAE, reference index and embedder."""
        ...

    def index(self, layer: int, corpus_spec: str, max_prompts: int) -> tuple[ReferenceIndex, TextEmbedder]:
        """A reference index of another corpus at ``layer`` (built once, cached) and its embedder."""
        ...

    def model(self, spec: str) -> LoadedModel:
        """A language model by spec (a judge, the acceptability classifier's feature model)."""
        ...


class DefaultLoader:
    """The embedded defaults of :mod:`saealign.defaults` (nothing from a model hub)."""

    def aligner(self, layer: int) -> Aligner:
        from saealign.defaults import default_companions, load_stack

        return Aligner(*load_stack(layer=layer), companions=default_companions(layer=layer))

    def index(self, layer: int, corpus_spec: str, max_prompts: int) -> tuple[ReferenceIndex, TextEmbedder]:
        from saealign.defaults import load_stack

        _lm, _sae, _layer, index, embedder = load_stack(layer=layer, corpus_spec=corpus_spec, max_prompts=max_prompts)
        return index, embedder

    def model(self, spec: str) -> LoadedModel:
        from saealign.models import load_model

        return load_model(spec)


@dataclass
class Workbench:
    """The shared side of an evaluation run (see the module docstring)."""

    data_root: Path | None
    """The shared data folder (``reference/``, ``topics/``, ``acceptability/``); None where no experiment reads it."""
    loader: Loader = field(default_factory=DefaultLoader)
    acceptability_max_train: int | None = None
    """CoLA sentences the acceptability classifier trains on (None: all); ``eval all --quick`` subsamples."""
    fine_tune_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each fine-tuning, by ``"fine-tune METHOD (TOPIC)"``, filled as models are tuned."""
    _aligners: dict[int, Aligner] = field(default_factory=dict, repr=False)
    _models: dict[str, LoadedModel] = field(default_factory=dict, repr=False)
    _tuned: dict[tuple[str, str, str], FineTuned] = field(default_factory=dict, repr=False)
    _acceptability: Callable[[list[str]], float] | None = field(default=None, repr=False)

    @property
    def data(self) -> Path:
        if self.data_root is None or not self.data_root.is_dir():
            raise SaealignError("the evaluation needs the shared data folder: pass --data DIR (holding reference/ and "
                                "topics/)")
        return self.data_root

    def aligner(self, layer: int) -> Aligner:
        if layer not in self._aligners:
            self._aligners[layer] = self.loader.aligner(layer)
        return self._aligners[layer]

    def model(self, spec: str, role: str = "judge") -> LoadedModel:
        if spec not in self._models:
            try:
                self._models[spec] = self.loader.model(spec)
            except SaealignError as e:
                raise SaealignError(f"cannot load the {role} model {spec!r} ({e}): pass --{role} with a loadable "
                                    "model") from None
        return self._models[spec]

    def embedder(self, layer: int) -> TextEmbedder:
        """The sentence embedder of the stack at ``layer`` (distances to topic text)."""
        embedder = self.aligner(layer).embedder
        if embedder is None:
            raise SaealignError("the evaluation measures distances to topic text: give the aligner an embedder")
        return embedder

    def finetuned(self, aligner: Aligner, texts: list[str], method: str, epochs: int = 3, label: str = "") -> FineTuned:
        """``aligner``'s model fine-tuned on ``texts`` (tuned once per workbench, then reused)."""
        from saealign.evaluate.finetune import FineTuneConfig, finetune

        key = (aligner.lm.key, hash_json([texts, epochs]), method)
        if key not in self._tuned:
            self._tuned[key] = finetune(aligner.lm, texts, FineTuneConfig(method=method, epochs=epochs))  # type: ignore[arg-type]
        if label:
            self.fine_tune_seconds[f"fine-tune {method} ({label})"] = self._tuned[key].seconds
        return self._tuned[key]

    def fine_tune_times(self, topics: list[str]) -> dict[str, float]:
        """The fine-tuning wall times of ``topics`` (the cost table reports them next to steering)."""
        return {k: v for k, v in self.fine_tune_seconds.items() if any(k.endswith(f"({t})") for t in topics)}

    def acceptability(self) -> Callable[[list[str]], float]:
        """Share of texts the CoLA classifier calls acceptable (on the default model's features; trained once, cached)."""
        if self._acceptability is None:
            from saealign.evaluate.acceptability import acceptability_rate, train_acceptability

            feature_lm = self.model("default", role="model")
            clf = train_acceptability(feature_lm, self.data / "acceptability", max_train=self.acceptability_max_train)
            self._acceptability = lambda texts: acceptability_rate(clf, feature_lm, texts)
        return self._acceptability
