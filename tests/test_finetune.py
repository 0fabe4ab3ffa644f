"""Fine-tuning baselines: full and LoRA training on a tiny random Llama, checked by exact identities."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from conftest import make_llama, make_texts, make_tokenizer
from saealign.errors import SaealignError
from saealign.evaluate.finetune import FineTuneConfig, FineTuned, finetune
from saealign.models import LoadedModel

TEXTS = make_texts(8, seed=3)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_run(tiny_lm: LoadedModel) -> tuple[FineTuned, dict[str, torch.Tensor]]:
    before = _snapshot(tiny_lm.model)
    return finetune(tiny_lm, TEXTS, FineTuneConfig(lr=1e-3, epochs=5, batch_size=4), progress=False), before


@pytest.fixture(scope="module")
def lora_run(tiny_lm: LoadedModel) -> FineTuned:
    return finetune(tiny_lm, TEXTS, FineTuneConfig(method="lora", lr=1e-2, epochs=5, batch_size=4), progress=False)


def _last_epoch_mean(run: FineTuned) -> float:
    per_epoch = math.ceil(len(TEXTS) / run.config.batch_size)
    return sum(run.losses[-per_epoch:]) / per_epoch


def test_full_lowers_loss_and_leaves_the_input_model_untouched(tiny_lm: LoadedModel, full_run) -> None:
    run, before = full_run
    assert _equal_state(_snapshot(tiny_lm.model), before)  # bit-identical: training used a copy
    assert _last_epoch_mean(run) < run.losses[0]
    tuned = run.lm.model.state_dict()
    assert tuned.keys() == before.keys()
    assert not torch.equal(tuned["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(tuned["model.layers.1.self_attn.q_proj.weight"],
                           before["model.layers.1.self_attn.q_proj.weight"])
    assert not run.lm.model.training and not any(p.requires_grad for p in run.lm.model.parameters())


def test_counts_and_key(tiny_lm: LoadedModel, full_run) -> None:
    run, _ = full_run
    # Every word is in the vocabulary and texts are short: one token per word plus BOS, no truncation.
    assert run.tokens_seen == 5 * sum(len(t.split()) + 1 for t in TEXTS)
    assert len(run.losses) == 5 * 2  # 5 epochs of 8 texts in batches of 4
    assert run.lm.key.startswith("tiny-ft-full-") and run.lm.tokenizer is tiny_lm.tokenizer
    assert run.seconds > 0


def test_key_depends_on_texts_and_resolved_config(tiny_lm: LoadedModel) -> None:
    cfg = FineTuneConfig(epochs=1)
    key = finetune(tiny_lm, TEXTS[:2], cfg, progress=False).lm.key
    assert finetune(tiny_lm, TEXTS[:2], FineTuneConfig(epochs=1, lr=5e-5), progress=False).lm.key == key
    assert finetune(tiny_lm, TEXTS[1:3], cfg, progress=False).lm.key != key


def test_lora_merges_into_the_base_architecture_and_changes_only_attention(tiny_lm: LoadedModel, lora_run) -> None:
    base, tuned = tiny_lm.model.state_dict(), lora_run.lm.model.state_dict()
    assert type(lora_run.lm.model) is type(tiny_lm.model)
    assert tuned.keys() == base.keys() and not any("lora_" in k for k in tuned)
    for name in base:
        if name.rsplit(".", 2)[-2] in ATTENTION:
            assert not torch.equal(tuned[name], base[name]), name
        else:
            assert torch.equal(tuned[name], base[name]), name  # MLP, norms, embeddings, head: untouched
    assert _last_epoch_mean(lora_run) < lora_run.losses[0]


@pytest.mark.parametrize(("method", "dtype"), [("full", torch.float32), ("lora", torch.bfloat16)])
def test_zero_learning_rate_returns_the_same_weights(method: str, dtype: torch.dtype) -> None:
    # lr 0: AdamW adds 0 * update; LoRA's B starts at zero so the merge adds exactly 0; bf16 -> fp32 -> bf16
    # is lossless. Every weight must come back bit-identical, in the original dtype.
    lm = LoadedModel(model=make_llama().to(dtype), tokenizer=make_tokenizer(), name="t", key="t", load_seconds=0.0)
    run = finetune(lm, TEXTS, FineTuneConfig(method=method, lr=0.0, epochs=1, batch_size=4), progress=False)  # type: ignore[arg-type]
    assert next(run.lm.model.parameters()).dtype == dtype
    assert _equal_state(_snapshot(run.lm.model), _snapshot(lm.model))


def test_same_seed_same_weights_and_global_rng_untouched(tiny_lm: LoadedModel, lora_run) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = finetune(tiny_lm, TEXTS, lora_run.config, progress=False)
    assert torch.equal(torch.rand(3), expected)  # the run drew from its own forked RNG stream
    assert _equal_state(_snapshot(again.lm.model), _snapshot(lora_run.lm.model))
    assert again.losses == lora_run.losses
    other = finetune(tiny_lm, TEXTS, FineTuneConfig(method="lora", lr=1e-2, epochs=5, batch_size=4, seed=1),
                     progress=False)
    assert not _equal_state(_snapshot(other.lm.model), _snapshot(lora_run.lm.model))


@pytest.mark.parametrize("texts", [[], ["", "  \n\t"]])
def test_no_usable_texts(tiny_lm: LoadedModel, texts: list[str]) -> None:
    with pytest.raises(SaealignError, match="empty or whitespace"):
        finetune(tiny_lm, texts, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "adam"}, "unknown fine-tuning method 'adam'"),
        ({"lr": -1e-4}, "lr must be a finite number >= 0"),
        ({"epochs": 0}, "must be at least 1"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
        ({"lora_targets": ()}, "lora_targets must be a non-empty tuple"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(SaealignError, match=match):
        FineTuneConfig(**kwargs)


def test_missing_lora_targets_list_what_exists(tiny_lm: LoadedModel) -> None:
    with pytest.raises(SaealignError, match=r"none of the LoRA targets \['c_attn'\].*'gate_proj'.*'q_proj'"):
        finetune(tiny_lm, TEXTS, FineTuneConfig(method="lora", lora_targets=("c_attn",)), progress=False)


def test_lora_without_peft_says_how_to_install(tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(SaealignError, match=r"LoRA needs peft: pip install 'saealign\[finetune\]'"):
        finetune(tiny_lm, TEXTS, FineTuneConfig(method="lora"), progress=False)
