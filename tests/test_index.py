"""The reference index: statistics equal a hand computation, compaction keeps what it says, resumption,
key checks, checksums and bounds at load, scoring identities."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import saealign.reference.workers as workers_module
from conftest import make_llama, make_sae, make_texts, make_tokenizer
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.corpus import Corpus
from saealign.reference.embed import HashingEmbedder
from saealign.reference.index import IndexConfig, IndexKeys, ReferenceIndex, build_index
from saealign.reference.scoring import kendall_tau
from saealign.residual_stream import content_mask, residuals_at, special_token_ids
from saealign.sae.autoencoder import SAE, sae_key

N_TEXTS = 40
CFG = IndexConfig(layer=0, shard_size=8, batch_size=3)  # 5 shards; batches of 3 mix lengths inside a shard
# Disjoint vocabularies of the two labels of the identity test (function words left out of both).
WORDS_A = ("cat", "dog", "bird", "fish", "tree", "house", "river", "sky", "sun", "moon", "star", "rain", "snow", "wind")
WORDS_B = ("red", "blue", "green", "big", "small", "old", "new", "fast", "slow", "runs", "sat", "sings", "swims", "grows")


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), name="tiny", key="tiny", load_seconds=0.0)


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own embedding store, so no test reads another's."""
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))


def two_label_corpus() -> Corpus:
    texts = make_texts(N_TEXTS, seed=3, min_words=4, max_words=14)
    labels = ["even" if i % 2 == 0 else "odd" for i in range(N_TEXTS)]
    return Corpus(texts, labels, ["test"] * N_TEXTS, name="two-labels")


def build(lm: LoadedModel, sae: SAE, corpus: Corpus, folder: Path, cfg: IndexConfig = CFG) -> ReferenceIndex:
    return build_index(lm, sae, corpus, HashingEmbedder(), folder, cfg, progress=False)


@pytest.fixture(scope="module")
def built(lm: LoadedModel, sae: SAE, tmp_path_factory: pytest.TempPathFactory) -> ReferenceIndex:
    folder = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEALIGN_CACHE", str(folder / "cache"))
        return build(lm, sae, two_label_corpus(), folder / "index")


def by_hand(lm: LoadedModel, sae: SAE, text: str) -> tuple[np.ndarray, np.ndarray, int]:
    """One prompt alone (no batch, no padding): sum and max ``[d_sae]`` of its latents, its token count."""
    tok = lm.tokenizer
    ids = torch.tensor([tok(text)["input_ids"]])
    mask = torch.ones_like(ids)
    keep = content_mask(ids, mask, special_token_ids(tok))
    acts = sae.encode(residuals_at(lm.model, 0, ids, mask)[keep]).float()
    return acts.sum(0).numpy(), acts.max(0).values.numpy(), int(keep.sum())


def within_half_a_level(index: ReferenceIndex, got: np.ndarray, want: np.ndarray) -> None:
    """Decoded values equal the true ones to within half a quantisation level of their prompt's range."""
    step = np.concatenate([sh.step for sh in index.shards]).astype(np.float64)
    bound = 2.0 ** (step[:, None] / 2) - 1 + 1e-6
    assert np.all(np.abs(got - want) <= bound * want)


# -- the statistics ---------------------------------------------------------------------------------
def test_statistics_equal_a_hand_computation(lm: LoadedModel, sae: SAE, built: ReferenceIndex) -> None:
    corpus = two_label_corpus()
    assert (built.n_prompts, built.d_sae) == (N_TEXTS, sae.d_sae) == built.act_sum.shape
    assert built.texts == corpus.texts and built.labels == corpus.labels
    sums, maxes, n_tok = (np.stack(a) for a in zip(*(by_hand(lm, sae, t) for t in corpus.texts), strict=True))
    np.testing.assert_array_equal(built.act_sum.toarray() > 0, sums > 0)  # the sparsity pattern is exact
    within_half_a_level(built, built.act_sum.toarray(), sums)
    np.testing.assert_array_equal(built.n_tokens, n_tok)
    # the word-level tokenizer prepends <s>: every word is a content token, <s> is not
    np.testing.assert_array_equal(built.n_tokens, [len(t.split()) for t in corpus.texts])
    np.testing.assert_allclose(built.latent_max_act, maxes.max(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(built.latent_total_act, sums.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(built.latent_n_prompts, (sums > 0).sum(0))
    assert built.latent_n_prompts.max() > 1 and (built.latent_n_prompts == 0).any()  # not all alike
    emb = HashingEmbedder().embed(corpus.texts)
    assert built.embeddings.shape == emb.shape
    np.testing.assert_allclose((built.embeddings * emb).sum(1), 1.0, atol=1e-3)  # int8 rows: cosine to the truth


def test_top_texts_are_ordered_by_activation(built: ReferenceIndex) -> None:
    latent = int(np.argmax(built.latent_n_prompts))
    column = built.act_sum[:, [latent]].toarray().ravel()
    top = built.top_texts(latent, n=4)
    order = np.argsort(-column, kind="stable")[:4]
    assert [t for t, _ in top] == [built.texts[i] for i in order]
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(column.max(), rel=1e-6)
    assert len(built.top_texts(latent, n=1000)) == built.latent_n_prompts[latent]


# -- resumption and reuse ---------------------------------------------------------------------------
def test_a_killed_build_resumes_to_the_same_bytes(lm: LoadedModel, sae: SAE, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = two_label_corpus()
    real = workers_module.prompt_statistics
    calls: list[str] = []

    def dies_on_third(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - same signature as the real one
        calls.append(args[3][0])
        if len(calls) == 3:
            raise RuntimeError("killed")  # the process dies mid-build
        return real(*args, **kwargs)

    monkeypatch.setattr(workers_module, "prompt_statistics", dies_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        build(lm, sae, corpus, tmp_path / "resumed")
    with pytest.raises(SaealignError, match="incomplete"):
        ReferenceIndex.load(tmp_path / "resumed")

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[3][0])
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(workers_module, "prompt_statistics", counting)
    resumed = build(lm, sae, corpus, tmp_path / "resumed")
    assert calls == [corpus.texts[8 * s] for s in (2, 3, 4)]  # shards 0 and 1 were not recomputed
    calls.clear()
    whole = build(lm, sae, corpus, tmp_path / "whole")
    assert len(calls) == 5
    assert resumed.manifest["shards"] == whole.manifest["shards"]  # same sizes and SHA-256, shard for shard
    assert (tmp_path / "resumed" / "texts.jsonl.gz").read_bytes() == (tmp_path / "whole" / "texts.jsonl.gz").read_bytes()
    assert resumed.texts == whole.texts and resumed.key == whole.key


def test_a_shard_left_by_a_killed_worker_is_rebuilt_never_used(lm: LoadedModel, sae: SAE, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = two_label_corpus().subset(range(24))
    folder = tmp_path / "idx"
    good = build(lm, sae, corpus, folder).manifest["shards"]
    manifest = json.loads((folder / "manifest.json").read_text())
    # a worker died after writing shard 1 but before the driver recorded it; shard 2 was half overwritten
    del manifest["shards"]["1"]
    manifest["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    shard2 = folder / "shards" / "00002.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:200])
    (folder / "shards" / "00001.safetensors").write_bytes(b"garbage from a dead worker")
    calls: list[str] = []
    real = workers_module.prompt_statistics

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[3][0])
        return real(*args, **kwargs)

    monkeypatch.setattr(workers_module, "prompt_statistics", counting)
    again = build(lm, sae, corpus, folder)
    assert calls == [corpus.texts[8], corpus.texts[16]]  # exactly shards 1 and 2, recomputed
    assert again.manifest["shards"] == good


def test_finished_index_is_loaded_not_rebuilt(lm: LoadedModel, sae: SAE, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = two_label_corpus().subset(range(12))
    first = build(lm, sae, corpus, tmp_path / "idx")

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a finished index was recomputed")

    monkeypatch.setattr(workers_module, "prompt_statistics", never)
    again = build(lm, sae, corpus, tmp_path / "idx")
    np.testing.assert_array_equal(again.act_sum.toarray(), first.act_sum.toarray())
    assert again.key == first.key
    other = make_sae(seed=2)
    with pytest.raises(SaealignError, match=f"other inputs.*sae {first.keys.sae} != {sae_key(other)}"):
        build(lm, other, corpus, tmp_path / "idx")
    with pytest.raises(SaealignError, match="other inputs.*corpus"):
        build(lm, sae, corpus.subset(range(11)), tmp_path / "idx")
    with pytest.raises(SaealignError, match="other inputs.*shard_size 8 != 4"):
        build(lm, sae, corpus, tmp_path / "idx", IndexConfig(layer=0, shard_size=4, batch_size=3))


def test_a_foreign_folder_is_never_written_into(lm: LoadedModel, sae: SAE, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(SaealignError, match="holds no saealign index"):
        build(lm, sae, two_label_corpus().subset(range(8)), folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_load_names_the_part_that_differs(lm: LoadedModel, sae: SAE, tmp_path: Path) -> None:
    corpus = two_label_corpus().subset(range(12))
    folder = tmp_path / "idx"
    index = build(lm, sae, corpus, folder)
    same = ReferenceIndex.load(folder, model_key="tiny", sae_key=sae_key(sae), layer=0, corpus_key=corpus.fingerprint(),
                               embedder_key=HashingEmbedder().fingerprint)
    assert same.key == index.key
    for kwargs, message in (({"sae_key": "0123"}, "built for SAE"), ({"layer": 1}, "built for layer 0, not 1"),
                            ({"model_key": "other"}, "built for model tiny, not other"),
                            ({"corpus_key": "c0ffee"}, f"built for corpus {corpus.fingerprint()}, not c0ffee"),
                            ({"embedder_key": "e"}, "built for embedder")):
        with pytest.raises(SaealignError, match=message):
            ReferenceIndex.load(folder, **kwargs)
    with pytest.raises(SaealignError, match="no index at"):
        ReferenceIndex.load(tmp_path / "nothing")


def test_manifest_damage_is_one_clear_line(lm: LoadedModel, sae: SAE, tmp_path: Path) -> None:
    corpus = two_label_corpus().subset(range(12))
    folder = tmp_path / "idx"
    build(lm, sae, corpus, folder)
    manifest = folder / "manifest.json"
    good = manifest.read_bytes()
    manifest.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SaealignError, match="corrupt"):
        ReferenceIndex.load(folder)
    with pytest.raises(SaealignError, match="corrupt"):
        build(lm, sae, corpus, folder)  # never silently overwritten
    manifest.write_bytes(good.replace(b'"complete": true', b'"complete": false'))
    with pytest.raises(SaealignError, match="incomplete"):
        ReferenceIndex.load(folder)
    manifest.write_text(json.dumps(json.loads(good) | {"version": 1}))
    with pytest.raises(SaealignError, match="not a saealign index of version 2 .*version 1"):
        ReferenceIndex.load(folder)


# -- a bad shard: checksums and bounds (issue 14) ------------------------------------------------------
def _rewrite(folder: Path, shard: int, edit) -> Path:  # noqa: ANN001 - edit(header, data) mutates data in place
    """Change a shard's bytes with ``edit`` and record the new checksum, as a forged or buggy writer would."""
    import hashlib
    import struct

    path = folder / "shards" / f"{shard:05d}.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header, memoryview(raw)[8 + n :])
    path.write_bytes(bytes(raw))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][str(shard)]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return path


def _tensor(header: dict, data: memoryview, name: str, dtype) -> np.ndarray:  # noqa: ANN001
    start, stop = header[name]["data_offsets"]
    return np.frombuffer(data[start:stop], dtype=dtype)


@pytest.mark.parametrize("case", ["latent_out_of_range", "nan_range", "code_pointers", "truncated", "embedding_byte"])
def test_a_bad_shard_is_one_line_naming_it(lm: LoadedModel, sae: SAE, tmp_path: Path, case: str) -> None:
    folder = tmp_path / "idx"
    build(lm, sae, two_label_corpus().subset(range(16)), folder)
    path = folder / "shards" / "00001.safetensors"
    if case == "latent_out_of_range":  # with a valid checksum: only the bounds check stands between it and the kernel
        _rewrite(folder, 1, lambda h, d: _tensor(h, d, "packed", np.uint8).__setitem__(slice(None), 0xFF))
        why = "prompt 8 has a latent index outside"
    elif case == "nan_range":
        _rewrite(folder, 1, lambda h, d: _tensor(h, d, "lo", np.float32).__setitem__(0, np.nan))
        why = "lo holds NaN"
    elif case == "code_pointers":
        _rewrite(folder, 1, lambda h, d: _tensor(h, d, "code_ptr", np.int64).__setitem__(1, -5))
        why = "code pointers"
    elif case == "truncated":  # e.g. copied from a full disk
        path.write_bytes(path.read_bytes()[:100])
        why = "100 bytes, the manifest says"
    else:  # one finite byte of one embedding changed: only the checksum can see it
        raw = bytearray(path.read_bytes())
        raw[-5000] ^= 0x10
        path.write_bytes(bytes(raw))
        why = "checksum mismatch"
    with pytest.raises(SaealignError, match=f"shard {path} is corrupt \\({why}.*rebuild") as caught:
        ReferenceIndex.load(folder)
    assert "\n" not in str(caught.value)


def test_build_rejects_bad_inputs(lm: LoadedModel, sae: SAE, tmp_path: Path) -> None:
    empty = Corpus([], [], [], name="empty")
    with pytest.raises(SaealignError, match="empty"):
        build(lm, sae, empty, tmp_path / "a")
    with pytest.raises(SaealignError):
        build(lm, make_sae(d_in=32), two_label_corpus(), tmp_path / "b")
    with pytest.raises(SaealignError, match="shard_size"):
        IndexConfig(layer=0, shard_size=0)


# -- scoring against the index ----------------------------------------------------------------------
def disjoint_corpus() -> tuple[Corpus, list[str]]:
    """Label A texts use only WORDS_A, label B texts only WORDS_B (20 each, interleaved)."""
    rng = random.Random(7)
    texts, labels = [], []
    for i in range(40):
        words = WORDS_A if i % 2 == 0 else WORDS_B
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))))
        labels.append("A" if i % 2 == 0 else "B")
    return Corpus(texts, labels, ["test"] * 40, name="disjoint"), texts[0::2]


def test_own_texts_of_one_label_rank_its_latents_first(lm: LoadedModel, sae: SAE, tmp_path: Path) -> None:
    corpus, topic = disjoint_corpus()
    index = build_index(lm, sae, corpus, HashingEmbedder(dim=256), tmp_path / "idx", CFG, progress=False)
    scores = index.score(topic, HashingEmbedder(dim=256), min_prompts=3)
    is_b = np.array([lab == "B" for lab in corpus.labels])
    fires = index.act_sum.toarray() > 0
    on_b = fires[is_b].any(axis=0)
    only_a = fires[~is_b].any(axis=0) & ~on_b
    a_latents, b_latents = np.flatnonzero(scores.scored & only_a), np.flatnonzero(scores.scored & on_b)
    assert len(a_latents) >= 3 and len(b_latents) >= 3  # the identity is not vacuous
    assert scores.scores[a_latents].min() > scores.scores[b_latents].max()
    ranked = scores.top(int(scores.scored.sum()))
    assert set(ranked[: len(a_latents)]) == set(a_latents.tolist())
    assert scores.sae_key == sae_key(sae) and scores.index_key == index.key and scores.topic_texts == topic


def test_score_errors(built: ReferenceIndex) -> None:
    emb = HashingEmbedder()
    for texts in ([], ["  ", "\n\t"]):
        with pytest.raises(SaealignError, match="no texts"):
            built.score(texts, emb)
    best = int(built.latent_n_prompts.max())
    with pytest.raises(SaealignError, match=f"no latent fires on >= {best + 1} reference prompts \\(best: {best}\\)"):
        built.score(["the cat"], emb, min_prompts=best + 1)
    assert built.score(["the cat"], emb, min_prompts=best).scored.sum() >= 1
    with pytest.raises(SaealignError, match="unknown summary"):
        built.score(["the cat"], emb, summary="median")
    with pytest.raises(SaealignError, match="unknown"):
        built.score(["the cat"], emb, metric="manhattan")
    with pytest.raises(SaealignError, match="embedded with"):
        built.score(["the cat"], HashingEmbedder(dim=32))  # the index was embedded with another width


class OtherEmbedder(HashingEmbedder):
    """Same width as the index's embedder, different vectors: its distances to the index mean nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.fingerprint = "another-embedder"

    def embed(self, texts, batch_size=64, progress=False):  # noqa: ANN001, ANN201
        return super().embed([t[::-1] for t in texts])


def test_score_refuses_another_embedder(built: ReferenceIndex) -> None:
    with pytest.raises(SaealignError, match="embedder"):
        built.score(["the cat"], OtherEmbedder(), min_prompts=1)


def test_every_summary_equals_its_definition(built: ReferenceIndex) -> None:
    """Each prepared summary times a one-hot prompt vector is that prompt's summary row, by its definition."""
    sums = built.act_sum.toarray()
    p = 5
    onehot = np.eye(built.n_prompts)[p]
    totals = np.concatenate([s.totals for s in built.shards])
    expected = {"normalized_sum": sums[p] / totals[p], "sum": sums[p], "mean": sums[p] / built.n_tokens[p],
                "binary": (sums[p] > 0).astype(np.float64)}
    for kind, row in expected.items():
        np.testing.assert_allclose(built.prepared(kind).transposed @ onehot, row, rtol=1e-6, atol=1e-9)
    with pytest.raises(SaealignError, match="summary 'max' needs per-token maxima"):
        built.prepared("max")


def test_kendall_tau_between_summaries(built: ReferenceIndex) -> None:
    emb = HashingEmbedder()
    topic = ["the cat sat on the old house", "a dog runs near the river"]
    by_summary = {s: built.score(topic, emb, summary=s, min_prompts=3) for s in ("normalized_sum", "sum", "binary")}
    assert kendall_tau(by_summary["sum"], by_summary["sum"]) == pytest.approx(1.0)
    for other in ("sum", "binary"):
        tau = kendall_tau(by_summary["normalized_sum"], by_summary[other])
        assert -1.0 <= tau <= 1.0 and np.isfinite(tau)


def test_in_memory_index_from_statistics() -> None:
    act = np.array([[1, 0, 2], [0, 3, 1], [2, 0, 0]], dtype=np.float32)
    keys = IndexKeys(model="m", sae="s", layer=0, corpus="c", embedder=HashingEmbedder().fingerprint)
    emb = HashingEmbedder().embed(["a", "b", "c"])
    index = ReferenceIndex.from_statistics(sp.csr_matrix(act), act[act > 0], np.array([2, 2, 1]), emb,
                                           ["a", "b", "c"], ["x", "y", "z"], keys)
    np.testing.assert_allclose(index.act_sum.toarray(), act, rtol=1e-6)  # one or two entries a row: range ends, exact
    np.testing.assert_array_equal(index.latent_n_prompts, [2, 1, 2])
    np.testing.assert_array_equal(index.latent_max_act, [2, 3, 2])
    assert index.texts == ["a", "b", "c"] and index.labels == ["x", "y", "z"]
    np.testing.assert_allclose(index.distances(emb)[:3], 0.0, atol=2e-3)  # each text is its own nearest topic text
