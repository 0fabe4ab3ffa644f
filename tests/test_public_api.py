"""The package root is the library's public face: every name of the issue, importable, lazily."""

from __future__ import annotations

import subprocess
import sys

import saealign

PUBLIC = {"Aligner", "TopicScores", "GenerationSpec", "Steering", "load_model", "load_sae", "build_index",
          "ReferenceIndex", "SaealignError", "Generation", "TokenEvent"}


def test_every_public_name_is_the_library_object() -> None:
    from saealign.errors import SaealignError
    from saealign.models import load_model
    from saealign.reference.index import ReferenceIndex, build_index
    from saealign.reference.scoring import TopicScores
    from saealign.sae.formats import load_sae
    from saealign.steering.aligner import Aligner
    from saealign.steering.edits import Steering
    from saealign.steering.generation import Generation, TokenEvent
    from saealign.steering.spec import GenerationSpec

    assert set(saealign.__all__) == PUBLIC
    library = {"Aligner": Aligner, "TopicScores": TopicScores, "GenerationSpec": GenerationSpec, "Steering": Steering,
               "load_model": load_model, "load_sae": load_sae, "build_index": build_index,
               "ReferenceIndex": ReferenceIndex, "SaealignError": SaealignError, "Generation": Generation,
               "TokenEvent": TokenEvent}
    for name, obj in library.items():
        assert getattr(saealign, name) is obj, name
    assert set(dir(saealign)) >= PUBLIC
    assert set(saealign._WHERE) == PUBLIC  # each public name knows its module


def test_import_is_lazy_and_unknown_names_fail() -> None:
    code = ("import sys, saealign; assert 'torch' not in sys.modules; "
            "from saealign import GenerationSpec, SaealignError; assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-800:]
    try:
        saealign.Nothing  # noqa: B018
    except AttributeError as e:
        assert "no attribute 'Nothing'" in str(e)
    else:
        raise AssertionError("an unknown name resolved")
