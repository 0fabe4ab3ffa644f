"""The default index shipped in the package: it verifies, fits the default stack's fingerprints, and any
stack it does not fit is told in one line (and gets its own index) instead of using it."""

from __future__ import annotations

from pathlib import Path

import pytest

from saealign.cache import hash_file
from saealign.defaults import DEFAULT_LAYER, SHIPPED_INDEX, resolve_sae, shipped_index
from saealign.errors import SaealignError
from saealign.models import LoadedModel, smollm2_gguf_path
from saealign.reference.corpus import Corpus
from saealign.reference.embed import DEFAULT_PACKAGE, HashingEmbedder, folder_fingerprint
from saealign.reference.index import ReferenceIndex
from saealign.sae.autoencoder import sae_key


class KeyOnly:
    """Just the fingerprint of the default embedder (its folder), without loading MiniLM."""

    def __init__(self) -> None:
        import importlib.util

        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
        assert spec is not None and spec.submodule_search_locations
        self.fingerprint = folder_fingerprint(Path(list(spec.submodule_search_locations)[0]) / "model")
        self.dim = 384


@pytest.fixture(scope="module")
def stack() -> tuple[LoadedModel, object]:
    lm = LoadedModel(model=None, tokenizer=None, name="default", key=hash_file(smollm2_gguf_path()), load_seconds=0.0)
    return lm, resolve_sae("default")


def test_the_shipped_index_fits_the_default_stack(stack: tuple[LoadedModel, object]) -> None:
    lm, sae = stack
    index = shipped_index(lm, sae, DEFAULT_LAYER, KeyOnly())  # type: ignore[arg-type]
    assert index is not None and index.folder == SHIPPED_INDEX
    assert index.n_prompts == 20_000 and index.d_sae == 4608 and index.keys.layer == DEFAULT_LAYER
    assert Corpus(index.texts, index.labels, [""] * index.n_prompts).fingerprint() == index.keys.corpus
    assert (index.latent_n_prompts >= 20).all()  # every latent scorable, as the default promises
    size = sum(p.stat().st_size for p in SHIPPED_INDEX.rglob("*") if p.is_file())
    assert size / index.n_prompts < 1024  # the compact format's promise: under 1 KB a prompt, every file counted


def test_another_stack_is_told_which_part_differs(stack: tuple[LoadedModel, object],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    lm, sae = stack
    other_layer = shipped_index(lm, sae, 6, KeyOnly())  # type: ignore[arg-type]
    assert other_layer is None
    assert "not using the shipped index" in capsys.readouterr().err
    assert shipped_index(lm, sae, DEFAULT_LAYER, HashingEmbedder(384)) is None  # type: ignore[arg-type]
    assert "built for embedder" in capsys.readouterr().err
    wrong = Corpus(["a text"], ["x"], [""])
    assert shipped_index(lm, sae, DEFAULT_LAYER, KeyOnly(), wrong) is None  # type: ignore[arg-type]
    assert f"built for corpus {ReferenceIndex.load(SHIPPED_INDEX).keys.corpus}, not {wrong.fingerprint()}" in \
        capsys.readouterr().err
    with pytest.raises(SaealignError, match=f"built for SAE {sae_key(sae)}, not 0123"):  # type: ignore[arg-type]
        ReferenceIndex.load(SHIPPED_INDEX, sae_key="0123")
    with pytest.raises(SaealignError, match="built for model .*, not feed"):
        ReferenceIndex.load(SHIPPED_INDEX, model_key="feed")
