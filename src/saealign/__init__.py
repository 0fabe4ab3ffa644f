"""saealign: align a language model's generations to any topic by editing a sparse autoencoder inside it.

The library in one import::

    from saealign import Aligner, GenerationSpec

    aligner = Aligner.default()                               # SmolLM2 + the shipped SAE + a WordNet index
    medical = aligner.topic(["The patient was given insulin.", "Symptoms include fever."])
    for g in aligner.generate(["My day was"], medical, GenerationSpec(method="swap", max_new_tokens=32)):
        print(g.text, g.contamination)

The package is laid out by stage of the data flow, each stage importing only those below it
(checked by ``make test``): ``sae/`` (the SAE interface, file formats, training, quality),
``reference/`` (corpora, embeddings, the reference index, M1 scoring), ``steering/`` (the spec, the
latent edits, decoding, the :class:`Aligner`, the automatic strength), ``evaluate/`` (the paper's
experiments), ``serve/`` (HTTP API and page) and ``cli/`` (the ``saealign`` command); ``models``,
``residual_stream``, ``defaults``, ``cache`` and ``errors`` are shared below them.

The names below are imported on first use, so ``import saealign`` alone stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "Aligner": "saealign.steering.aligner",
    "Generation": "saealign.steering.generation",
    "TokenEvent": "saealign.steering.generation",
    "GenerationSpec": "saealign.steering.spec",
    "Steering": "saealign.steering.edits",
    "TopicScores": "saealign.reference.scoring",
    "ReferenceIndex": "saealign.reference.index",
    "build_index": "saealign.reference.index",
    "load_model": "saealign.models",
    "load_sae": "saealign.sae.formats",
    "SaealignError": "saealign.errors",
}
__all__ = [
    "Aligner", "Generation", "GenerationSpec", "ReferenceIndex", "SaealignError", "Steering", "TokenEvent",
    "TopicScores", "build_index", "load_model", "load_sae",
]  # fmt: skip

if TYPE_CHECKING:
    from saealign.errors import SaealignError
    from saealign.models import load_model
    from saealign.reference.index import ReferenceIndex, build_index
    from saealign.reference.scoring import TopicScores
    from saealign.sae.formats import load_sae
    from saealign.steering.aligner import Aligner
    from saealign.steering.edits import Steering
    from saealign.steering.generation import Generation, TokenEvent
    from saealign.steering.spec import GenerationSpec


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'saealign' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
