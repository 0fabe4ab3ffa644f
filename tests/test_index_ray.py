"""The Ray engine on a local 2-CPU Ray instance: the same shards as the single-process build, resumption,
and one clear line for a cluster that cannot be reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_llama, make_sae, make_texts, make_tokenizer
from saealign.errors import SaealignError
from saealign.reference.corpus import Corpus
from saealign.reference.index import IndexConfig, build_index
from saealign.reference.workers import BuildSpec

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'saealign[ray]')")
from saealign.reference.ray_engine import build_index_ray, connect  # noqa: E402 - after the skip

CFG = IndexConfig(layer=0, shard_size=8, batch_size=3)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> BuildSpec:
    """The tiny Llama and SAE written to folders: Ray actors load them by path, as they would a real model."""
    root = tmp_path_factory.mktemp("stack")
    make_llama().save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    make_sae().save(root / "sae")
    return BuildSpec(model=str(root / "model"), sae=str(root / "sae"), embedder="hashing:64", dtype="float32")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    texts = make_texts(40, seed=5, min_words=4, max_words=14)
    return Corpus(texts, [f"l{i % 3}" for i in range(40)], ["test"] * 40, name="ray-tiny")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> object:
    cache = tmp_path_factory.mktemp("ray-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEALIGN_CACHE", str(cache))  # the actors inherit it: their embedding store is private too
        assert connect(num_cpus=2)
        yield ray
        ray.shutdown()


def test_an_unreachable_cluster_is_one_line() -> None:
    assert not ray.is_initialized()
    with pytest.raises(SaealignError, match="cannot reach the Ray cluster at 127.0.0.1:9 .*ray start --head"):
        connect("127.0.0.1:9")  # the discard port: nothing listens there
    with pytest.raises(SaealignError, match="not HOST:PORT"):
        connect("nowhere")


def test_index_build_engine_ray_names_the_unreachable_cluster(spec: BuildSpec, corpus: Corpus, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from saealign.cli.app import main

    texts = tmp_path / "corpus.txt"
    texts.write_text("\n".join(corpus.texts) + "\n")
    result = CliRunner().invoke(main, ["index", "build", "--engine", "ray", "--ray-address", "127.0.0.1:9",
                                       "--model", spec.model, "--sae", spec.sae, "--layer", "0",
                                       "--corpus", str(texts), "--out", str(tmp_path / "idx")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in result.output
    assert not (tmp_path / "idx").exists()  # nothing written before the cluster answered


def test_ray_builds_the_same_index_as_one_process(spec: BuildSpec, corpus: Corpus, local_ray: object,
                                                 tmp_path: Path) -> None:
    lm, sae, embedder = spec.load()
    single = build_index(lm, sae, corpus, embedder, tmp_path / "single", CFG, progress=False)
    on_ray = build_index_ray(spec, corpus, tmp_path / "ray", CFG, workers=2, progress=False)
    assert on_ray.manifest["keys"] == single.manifest["keys"] and on_ray.n_prompts == 40
    # every shard file byte for byte: summaries, embeddings and per-latent statistics
    assert on_ray.manifest["shards"] == single.manifest["shards"]
    assert (on_ray.act_sum != single.act_sum).nnz == 0
    assert (on_ray.latent_n_prompts == single.latent_n_prompts).all()
    assert on_ray.texts == single.texts and on_ray.labels == single.labels


def test_ray_resumes_and_rebuilds_what_a_killed_worker_left(spec: BuildSpec, corpus: Corpus, local_ray: object,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "ray"
    good = build_index_ray(spec, corpus, folder, CFG, workers=2, progress=False).manifest["shards"]
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["shards"]["3"]  # its worker died before the driver heard of the shard
    manifest["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "shards" / "00003.safetensors").write_bytes(b"half a shard")
    shard1 = folder / "shards" / "00001.safetensors"
    shard1.write_bytes(shard1.read_bytes()[:-10])  # cut short after it was recorded
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "shards").iterdir()}
    again = build_index_ray(spec, corpus, folder, CFG, workers=2, progress=False)
    assert again.manifest["shards"] == good
    rewritten = {p.name for p in (folder / "shards").iterdir() if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert rewritten == {"00001.safetensors", "00003.safetensors"}  # only the two bad shards were recomputed
