"""Loading models, finding layer L in each architecture, content masks, the cache and its atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from conftest import make_llama, make_tokenizer
from saealign import models
from saealign.cache import cache_dir, cache_root
from saealign.errors import SaealignError
from saealign.models import default_dtype, load_model
from saealign.residual_stream import (
    content_mask,
    decoder_layers,
    layer_module,
    massive_positions,
    residuals_at,
    residuals_at_layers,
    special_token_ids,
)

N_LAYERS, VOCAB = 3, 64


def _arch(name: str) -> tuple[nn.Module, nn.Module]:
    """A tiny random model of one architecture (3 blocks, d_model 32) and its final norm module."""
    import transformers as tr

    dec = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    # sliding_window 4 < sequence length 9, so the local-attention code paths really run.
    configs = {
        "llama": (tr.LlamaConfig, tr.LlamaForCausalLM, dec),
        "gemma2": (tr.Gemma2Config, tr.Gemma2ForCausalLM, {**dec, "head_dim": 8, "sliding_window": 4}),
        "gemma3": (tr.Gemma3TextConfig, tr.Gemma3ForCausalLM, {**dec, "head_dim": 8, "sliding_window": 4}),
        "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM, dec),
        "mistral": (tr.MistralConfig, tr.MistralForCausalLM, {**dec, "sliding_window": 4}),
        "gpt2": (tr.GPT2Config, tr.GPT2LMHeadModel,
                 dict(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64,
                      bos_token_id=0, eos_token_id=0)),
        "gpt_neox": (tr.GPTNeoXConfig, tr.GPTNeoXForCausalLM,
                     dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                          num_attention_heads=4, max_position_embeddings=64)),
    }
    config_cls, model_cls, kwargs = configs[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    final_norm = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}.get(name, "model.norm")
    return model, model.get_submodule(final_norm)


ARCHS = ["llama", "gemma2", "gemma3", "qwen2", "mistral", "gpt2", "gpt_neox"]


def _inputs() -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0: the mask must reach the blocks the same way in both paths
    return ids, mask


def _hidden_states(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


# -- layer L in every architecture -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_residuals_match_hidden_states(arch: str):
    model, final_norm = _arch(arch)
    ids, mask = _inputs()
    hs = _hidden_states(model, ids, mask)
    blocks = decoder_layers(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == N_LAYERS
    for layer in range(N_LAYERS - 1):
        assert layer_module(model, layer) is blocks[layer]
        assert torch.equal(residuals_at(model, layer, ids, mask), hs[layer + 1])
    # HF applies the final norm to the last hidden state; the hook sees the stream before it.
    last = residuals_at(model, N_LAYERS - 1, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(final_norm(last), hs[-1])
    both = residuals_at_layers(model, [1, 0], ids, mask)
    assert list(both) == [1, 0]
    assert torch.equal(both[0], hs[1]) and torch.equal(both[1], hs[2])


def test_negative_layers_count_back():
    model, _ = _arch("llama")
    ids, mask = _inputs()
    assert layer_module(model, -1) is decoder_layers(model)[N_LAYERS - 1]
    got = residuals_at_layers(model, [-2, 1], ids, mask)
    assert set(got) == {-2, 1}
    assert torch.equal(got[-2], got[1])


def test_partial_forward_stops_after_the_deepest_layer():
    model, final_norm = _arch("llama")
    ids, mask = _inputs()
    fired: list[str] = []
    handles = [
        decoder_layers(model)[2].register_forward_hook(lambda *_: fired.append("block2")),
        final_norm.register_forward_hook(lambda *_: fired.append("norm")),
    ]
    try:
        residuals_at_layers(model, [0, 1], ids, mask)
        assert fired == []
        residuals_at(model, 2, ids, mask)
        assert fired == ["block2"]
        # The stopping hooks were removed: a normal forward afterwards runs to the end.
        _hidden_states(model, ids, mask)
        assert fired == ["block2", "block2", "norm"]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("layer", [3, -4, 100])
def test_out_of_range_layer_names_the_valid_range(layer: int):
    model, _ = _arch("llama")
    ids, mask = _inputs()
    with pytest.raises(SaealignError, match=r"0\.\.2") as err:
        layer_module(model, layer)
    assert "\n" not in str(err.value)
    with pytest.raises(SaealignError, match=r"0\.\.2"):
        residuals_at_layers(model, [0, layer], ids, mask)


def test_unknown_architecture_is_one_line_error():
    with pytest.raises(SaealignError, match="cannot find the decoder blocks of Linear"):
        decoder_layers(nn.Linear(2, 2))


# -- load_model ------------------------------------------------------------------------------------
def _save_tiny(folder: Path, seed: int = 0, with_pad: bool = False) -> nn.Module:
    model = make_llama(seed)
    model.save_pretrained(folder)
    make_tokenizer(with_pad=with_pad).save_pretrained(folder)
    return model


def test_load_model_from_folder(tmp_path: Path):
    original = _save_tiny(tmp_path)
    lm = load_model(str(tmp_path), dtype=torch.float32)
    assert lm.name == str(tmp_path)
    assert (lm.n_layers, lm.d_model) == (2, 64)
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    # The saved tokenizer has no pad token: load_model falls back to EOS so batches can be padded.
    assert lm.tokenizer.pad_token == "</s>"
    assert special_token_ids(lm.tokenizer) == {1, 2, 3}
    ids = lm.tokenizer(["the cat sat on the tree", "a dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = original(**ids).logits
        got = lm.model(**ids).logits
    assert torch.equal(got, expected)


def test_load_model_key_is_stable_and_follows_the_weights(tmp_path: Path):
    _save_tiny(tmp_path, seed=0)
    first = load_model(str(tmp_path), dtype=torch.float32).key
    assert load_model(str(tmp_path), dtype=torch.float32).key == first
    _save_tiny(tmp_path, seed=1)
    assert load_model(str(tmp_path), dtype=torch.float32).key != first


def test_load_model_key_sees_changes_past_the_first_mebibyte(tmp_path: Path):
    # A fine-tune that leaves the embeddings alone changes only bytes far into the file.
    model = make_llama(0, intermediate=2048)  # ~3 MiB of weights
    model.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    first = load_model(str(tmp_path), dtype=torch.float32).key
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # stored last in the safetensors file
    model.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), dtype=torch.float32).key != first


def test_load_model_missing_hub_id_is_one_line(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; without this the lookup waits on the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SaealignError, match="no/such-model") as err:
        load_model("no/such-model", dtype=torch.float32)
    assert "\n" not in str(err.value)


def test_load_model_folder_without_a_model_is_one_line(tmp_path: Path):
    with pytest.raises(SaealignError, match=str(tmp_path)):
        load_model(str(tmp_path), dtype=torch.float32)


def test_load_model_missing_gguf():
    with pytest.raises(SaealignError, match="nothing.gguf not found"):
        load_model("/no/such/nothing.gguf")


# -- content mask ----------------------------------------------------------------------------------
def test_content_mask_right_and_left_padding():
    special = {1, 2}  # BOS, EOS; 0 is padding
    ids = torch.tensor([
        [1, 7, 8, 9, 2, 0],  # right padded: BOS first, EOS special, then pad
        [0, 0, 7, 2, 8, 9],  # left padded, no BOS: first real token (7) is left out
        [0, 0, 0, 1, 7, 8],  # left padded with BOS
    ])
    mask = (ids != 0).long()
    expected = torch.tensor([
        [False, True, True, True, False, False],
        [False, False, False, False, True, True],
        [False, False, False, False, True, True],
    ])
    assert torch.equal(content_mask(ids, mask, special), expected)


def test_content_mask_without_special_ids_still_drops_first_and_padding():
    ids = torch.tensor([[5, 6, 7], [0, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert torch.equal(content_mask(ids, mask, set()), torch.tensor([[False, True, True], [False, False, True]]))


def test_massive_positions_by_hand():
    # norms 1, 2, 3, 50, 2, 1000 (pad): the median of the kept norms is 2, so only norms above 20 count,
    # and a position outside ``keep`` (here the padded one) never does
    norms = torch.tensor([[1.0, 2.0, 3.0], [50.0, 2.0, 1000.0]])
    hidden = torch.zeros(2, 3, 4)
    hidden[..., 0] = norms
    keep = torch.tensor([[True, True, True], [True, True, False]])
    assert torch.equal(massive_positions(hidden, keep), torch.tensor([[False, False, False], [True, False, False]]))
    assert torch.equal(massive_positions(hidden, keep, factor=1.4), torch.tensor([[False, False, True], [True, False, False]]))
    assert not massive_positions(hidden, torch.zeros_like(keep)).any()


def test_content_mask_ignores_special_ids_in_padding():
    # Padding with the EOS id (the load_model fallback) must not matter: padding is excluded anyway.
    ids = torch.tensor([[1, 7, 2, 2]])
    mask = torch.tensor([[1, 1, 0, 0]])
    assert torch.equal(content_mask(ids, mask, {1, 2}), torch.tensor([[False, True, False, False]]))


# -- cache location and atomic writes --------------------------------------------------------------
def test_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine" and cache_root().is_dir()
    assert cache_dir("models", "x") == tmp_path / "mine" / "models" / "x"
    monkeypatch.delenv("SAEALIGN_CACHE")
    assert cache_root() == tmp_path / "xdg" / "saealign"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "saealign"


# atomic_dir itself: tests/test_cache.py


# -- dtype -----------------------------------------------------------------------------------------
def test_default_dtype_follows_the_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = torch.bfloat16 if models._cpu_has_fast_bf16() else torch.float32
    assert default_dtype() == expected
    monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda: True)
    assert default_dtype() == torch.bfloat16
    monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda: False)
    assert default_dtype() == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_dtype() == torch.bfloat16


# -- the real embedded model -----------------------------------------------------------------------
@pytest.mark.real
def test_real_default_model_knows_paris(real_lm):
    assert (real_lm.n_layers, real_lm.d_model) == (30, 576)
    tok = real_lm.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = real_lm.model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_the_output_head_reads_a_contiguous_input_once():
    """Generation's ``logits_to_keep=1`` hands the head a strided slice (slow in bf16 on a CPU); every LoadedModel's
    head gets it contiguous, with the logits the full pass gives at the last position."""
    lm = models.LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), name="t", key="t", load_seconds=0.0)
    head = lm.model.get_output_embeddings()
    seen: list[bool] = []
    head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        last = lm.model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        full = lm.model(input_ids=ids).logits[:, -1]
    assert seen == [True, True] and torch.equal(last, full)
    assert models.contiguous_head(lm.model) is None  # installed once, however many LoadedModels share the model
    models.LoadedModel(model=lm.model, tokenizer=lm.tokenizer, name="t2", key="t2", load_seconds=0.0)
    assert sum(h is models._contiguous_input for h in head._forward_pre_hooks.values()) == 1
    assert models.contiguous_head(None) is None  # an index-only LoadedModel has no model


def test_without_the_hook_the_head_would_read_a_strided_slice():
    """The case the hook exists for: transformers slices the last position without copying."""
    model = make_llama()
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 60, (3, 7)), logits_to_keep=1)
    assert seen == [False]
