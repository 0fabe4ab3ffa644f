"""Shared fixtures: an offline word-level tokenizer, a tiny random Llama and SAE, the real default LM.

Nothing here downloads: the tokenizer is built from a fixed word list, the models from configs.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from saealign.models import LoadedModel
from saealign.sae.autoencoder import SAE, SAEConfig

D_MODEL = 64
WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "was", "it", "on", "for", "with", "as", "at", "by", "from",
    "this", "that", "cat", "dog", "bird", "fish", "tree", "house", "river", "sky", "sun", "moon", "star",
    "rain", "snow", "wind", "red", "blue", "green", "big", "small", "old", "new", "fast", "slow", "runs",
    "sat", "sings", "swims", "grows", "falls", "shines", "over", "under", "near", "far", "water", "light",
    "dark", "warm", "cold",
)  # fmt: skip
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def make_tokenizer(with_pad: bool = True):  # noqa: ANN201 - a transformers tokenizer
    """Word-level tokenizer over ``WORDS``; prepends ``<s>`` like Llama tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIALS, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra)


def make_llama(seed: int = 0, n_layers: int = 2, intermediate: int = 128) -> nn.Module:
    """A random LlamaForCausalLM with d_model 64 over the tiny vocabulary (eval mode, no grad)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=D_MODEL,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        initializer_range=0.1,  # larger than the 0.02 default, so the residual stream is not near zero
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def make_texts(n: int, seed: int = 0, min_words: int = 10, max_words: int = 20) -> list[str]:
    """``n`` random sentences over ``WORDS`` (every word is in the vocabulary: no ``<unk>``)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def make_sae(d_in: int = D_MODEL, expansion: int = 4, k: int = 8, seed: int = 1) -> SAE:
    """A random TopK SAE with unit-norm decoder rows."""
    g = torch.Generator().manual_seed(seed)
    d_sae = d_in * expansion
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k, hook_layer=0)
    return SAE(cfg, W_enc=w_dec.T, b_enc=torch.randn(d_sae, generator=g) * 0.1, W_dec=w_dec,
               b_dec=torch.randn(d_in, generator=g) * 0.1).requires_grad_(False)


def build_tiny_index(lm: LoadedModel, sae: SAE, folder, texts: list[str], labels: list[str],  # noqa: ANN001
                     shard_size: int, batch_size: int = 32):  # noqa: ANN201 - a ReferenceIndex
    """A layer-0 index of ``texts`` in ``folder / "idx"``, HashingEmbedder, its caches under ``folder / "cache"``."""
    from saealign.reference.corpus import Corpus
    from saealign.reference.embed import HashingEmbedder
    from saealign.reference.index import IndexConfig, build_index

    corpus = Corpus(texts, labels, ["test"] * len(texts), name="tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEALIGN_CACHE", str(folder / "cache"))
        return build_index(lm, sae, corpus, HashingEmbedder(), folder / "idx",
                           IndexConfig(layer=0, shard_size=shard_size, batch_size=batch_size), progress=False)


def push_aligner(sae: SAE):  # noqa: ANN201 - a saealign Aligner
    """An Aligner over a fresh ``make_llama`` and ``sae`` at layer 0, with a HashingEmbedder and no index: enough for the
    additive push's options (prompt boost, concept slot). Set SAEALIGN_CACHE first (the steering basis is cached)."""
    from saealign.reference.embed import HashingEmbedder
    from saealign.steering.aligner import Aligner

    lm = LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), name="tiny", key="tiny", load_seconds=0.0)
    return Aligner(lm, sae, 0, embedder=HashingEmbedder())


def push_topic(sae: SAE):  # noqa: ANN201 - saealign TopicScores
    """Random scores and activation contrast over every latent of ``sae`` (seeded), with one topic text."""
    import numpy as np

    from saealign.reference.scoring import TopicScores
    from saealign.sae.autoencoder import sae_key

    s = np.random.default_rng(0).random(sae.d_sae).astype(np.float32)
    return TopicScores(s, np.zeros(sae.d_sae), np.full(sae.d_sae, 30), np.ones(sae.d_sae, bool), ["the dog sat"],
                       sae_key=sae_key(sae), contrast=np.random.default_rng(1).random(sae.d_sae).astype(np.float32))


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    """A 2-block random Llama (d_model 64, float32) with the word-level tokenizer."""
    return LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), name="tiny-llama", key="tiny", load_seconds=0.0)


@pytest.fixture
def tiny_sae() -> SAE:
    """A random TopK SAE 64 -> 256, k 8, for layer 0 of ``tiny_lm``."""
    return make_sae()


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    """The embedded default LM, loaded through the user's own cache so later runs reuse the conversion."""
    from saealign.models import load_model

    return load_model("default")


# -- a live server: uvicorn on a free loopback port serving a tiny Aligner (tests/test_page.py) ----
def make_aligner(index_folder, chat_template: str | None = None):  # noqa: ANN201 - a saealign Aligner
    """An Aligner over ``make_llama``, ``make_sae`` and a 64-text index built (or reused) in ``index_folder``.

    Layer 0, HashingEmbedder: nothing is downloaded. Set SAEALIGN_CACHE first (the index caches activations).
    """
    from saealign.reference.corpus import Corpus
    from saealign.reference.embed import HashingEmbedder
    from saealign.reference.index import IndexConfig, build_index
    from saealign.steering.aligner import Aligner

    tok = make_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    lm = LoadedModel(model=make_llama(), tokenizer=tok, name="tiny-llama", key="tiny", load_seconds=0.0)
    sae = make_sae()
    texts = make_texts(64, seed=1)
    corpus = Corpus(texts, ["x"] * len(texts), ["test"] * len(texts), name="tiny")
    index = build_index(lm, sae, corpus, HashingEmbedder(), index_folder, IndexConfig(layer=0, shard_size=16),
                        progress=False)
    return Aligner(lm, sae, 0, index, HashingEmbedder())


class LiveServer:
    """``with LiveServer(app) as url:`` serves the ASGI ``app`` with uvicorn in a daemon thread on a free
    loopback port (bound before the thread starts, so there is no race for it) until the block ends."""

    def __init__(self, app: object, start_timeout_s: float = 20.0) -> None:
        self.app, self.start_timeout_s = app, start_timeout_s

    def __enter__(self) -> str:
        import socket
        import threading
        import time

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class TinyLoader:
    """A :class:`saealign.evaluate.workbench.Loader` over one tiny stack (pass it as ``main(obj=...)``):
    every layer gets an Aligner of ``lm``, ``sae`` and ``index``; every model spec gets ``lm``."""

    def __init__(self, lm: LoadedModel, sae: SAE, index, auto_config=None) -> None:  # noqa: ANN001
        self.lm, self.sae, self.reference_index, self.auto_config = lm, sae, index, auto_config

    def aligner(self, layer: int):  # noqa: ANN201 - an Aligner
        from saealign.reference.embed import HashingEmbedder
        from saealign.steering.aligner import Aligner

        aligner = Aligner(self.lm, self.sae, layer, self.reference_index, HashingEmbedder())
        if self.auto_config is not None:
            aligner.auto_config = self.auto_config
        return aligner

    def index(self, layer: int, corpus_spec: str, max_prompts: int):  # noqa: ANN201
        from saealign.reference.embed import HashingEmbedder

        return self.reference_index, HashingEmbedder()

    def model(self, spec: str) -> LoadedModel:
        return self.lm


class RefusingLoader:
    """A loader that fails the test on any load: bad input must be refused before a model loads."""

    def aligner(self, layer: int) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    index = model = aligner  # type: ignore[assignment]
