"""The steering stack on a CUDA device does what it does on the CPU (run where a GPU is; skipped elsewhere).

Nothing in CI has a GPU, so these run on a lent GPU machine (`pytest tests/test_cuda.py`). Each compares the
same tiny model, SAE and topic on both devices in float32: greedy generations must pick the same tokens, and the
per-SAE measurements (output scores, promoted tokens, the reference index) must agree to float tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_index, make_llama, make_sae, make_texts, make_tokenizer
from saealign.models import LoadedModel
from saealign.reference.embed import HashingEmbedder
from saealign.steering.aligner import Aligner
from saealign.steering.spec import GenerationSpec as Spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOPIC = ["the river runs under the dark sky", "water falls over the old tree", "the fish swims in cold water"]
PROMPTS = ["the cat", "a dog runs near the house", "the sun"]
SPECS = {
    "swap": Spec("swap", greedy=True, max_new_tokens=8),
    "add": Spec("add", strength=1.0, greedy=True, max_new_tokens=8),
    "add with feedback": Spec("add", strength=1.0, feedback=True, greedy=True, max_new_tokens=8),
    "swap_add": Spec("swap_add", strength=0.5, greedy=True, max_new_tokens=8),
    "diffmean": Spec("diffmean", strength=1.0, greedy=True, max_new_tokens=8),
}


def _tiny_lm(device: str) -> LoadedModel:
    """conftest's tiny Llama (the same weights on every call) on ``device``."""
    return LoadedModel(model=make_llama().to(device), tokenizer=make_tokenizer(), name="tiny-llama", key="tiny",
                       load_seconds=0.0)


def _aligners(folder: Path) -> tuple[Aligner, Aligner]:
    """The same tiny stack on the CPU and on CUDA, sharing one index built on the CPU."""
    texts = make_texts(48, seed=3)
    cpu_lm, cpu_sae = _tiny_lm("cpu"), make_sae()
    index = build_tiny_index(cpu_lm, cpu_sae, folder, texts, ["x"] * len(texts), shard_size=8)
    gpu = Aligner(_tiny_lm("cuda"), make_sae().to("cuda"), 0, index, HashingEmbedder())
    return Aligner(cpu_lm, cpu_sae, 0, index, HashingEmbedder()), gpu


def test_greedy_steering_picks_the_same_tokens_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = _aligners(tmp_path)
    topic = cpu.topic(TOPIC)
    for name, spec in SPECS.items():
        # separate caches, so each device measures its own output scores and descriptions
        monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache-cpu"))
        on_cpu = cpu.generate(PROMPTS, topic, spec)
        monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache-gpu"))
        on_gpu = gpu.generate(PROMPTS, topic, spec)
        assert [g.token_ids for g in on_gpu] == [g.token_ids for g in on_cpu], name
        for a, b in zip(on_gpu, on_cpu, strict=True):
            assert a.token_contamination is not None and b.token_contamination is not None
            np.testing.assert_allclose(a.token_contamination, b.token_contamination, atol=1e-4, err_msg=name)
    # output scores are rank percentiles and promoted tokens are top-k lists: a float near-tie may swap one
    # neighbouring pair, nothing more
    d_sae = cpu.sae.d_sae
    np.testing.assert_allclose(gpu.steering_basis().output_scores, cpu.steering_basis().output_scores, atol=2.5 / d_sae)
    assert gpu.steering_basis().residual_norm == pytest.approx(cpu.steering_basis().residual_norm, rel=1e-4)
    same = gpu.latent_descriptions().token_ids == cpu.latent_descriptions().token_ids
    assert same.mean() > 0.98, f"{same.mean():.4f} of promoted tokens agree"


def test_an_index_built_on_cuda_matches_the_cpu_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = make_texts(40, seed=5)
    labels = ["x"] * len(texts)
    on_cpu = build_tiny_index(_tiny_lm("cpu"), make_sae(), tmp_path / "cpu", texts, labels, shard_size=8)
    on_gpu = build_tiny_index(_tiny_lm("cuda"), make_sae().to("cuda"), tmp_path / "gpu", texts, labels, shard_size=8)
    assert on_gpu.n_prompts == on_cpu.n_prompts == len(texts)
    a, b = on_gpu.act_sum.toarray(), on_cpu.act_sum.toarray()
    assert np.array_equal(a > 0, b > 0)  # the same latents fire on the same prompts
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
