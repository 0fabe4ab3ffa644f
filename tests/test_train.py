"""SAE training on a tiny random Llama: recipe invariants, determinism, exact resume, evaluation, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import D_MODEL, make_llama, make_texts, make_tokenizer
from saealign.cli.app import main
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.residual_stream import residuals_at
from saealign.sae import training as train
from saealign.sae.activations import activation_stream
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.sae.checkpoint import load_checkpoint
from saealign.sae.formats import load_sae
from saealign.sae.quality import evaluate_sae
from saealign.sae.topk_trainer import TopKTrainer
from saealign.sae.train_config import TrainConfig, lr_for
from saealign.sae.training import train_and_save, train_saes

# 8 steps of 256 tokens; buffers of ~900 tokens (3 steps each), so a run writes 3 checkpoints.
# dead_tokens 512: latents count as dead after two steps, so the AuxK branch runs too.
CFG = TrainConfig(
    layers=(0, 1), expansion=4, k=4, tokens=2048, batch_tokens=256, buffer_tokens=512, max_seq_len=32,
    text_batch=4, lr=1e-2, warmup_steps=1, dead_tokens=512,
)
TEXTS = make_texts(60)


def _weights(saes: dict[int, SAE]) -> dict[str, torch.Tensor]:
    return {f"{layer}.{k}": v for layer, sae in saes.items() for k, v in sae.state_dict().items()}


def _assert_same(a: dict[int, SAE], b: dict[int, SAE]) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def trained(tiny_lm: LoadedModel) -> tuple[dict[int, SAE], dict[str, float], list[tuple[int, float]]]:
    """One uninterrupted run of CFG, with the FVU of every step recorded."""
    fvus: list[tuple[int, float]] = []
    original = TopKTrainer.train_batch

    def recording(self: TopKTrainer, x: torch.Tensor) -> None:
        original(self, x)
        fvus.append((self.layer, self.last["fvu"]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TopKTrainer, "train_batch", recording)
        saes, facts = train_saes(tiny_lm, TEXTS, CFG, progress=False)
    return saes, facts, fvus


# -- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layers": ()}, "at least one layer"),
        ({"tokens": 100, "batch_tokens": 256}, r"--tokens \(100\) must be at least one batch \(256\)"),
        ({"k": 0}, "k and expansion must be positive"),
        ({"expansion": -1}, "k and expansion must be positive"),
    ],
)
def test_train_config_rejects_bad_values(changes: dict, message: str):
    with pytest.raises(SaealignError, match=message):
        replace(CFG, **changes)


def test_train_config_steps_and_default_lr():
    assert CFG.steps == 8
    assert TrainConfig(tokens=10_000, batch_tokens=4096).steps == 2
    assert lr_for(2**16, TrainConfig(lr=None)) == pytest.approx(1e-4)  # 2e-4 / sqrt(4)
    assert lr_for(2**16, TrainConfig(lr=3e-3)) == 3e-3


# -- training -----------------------------------------------------------------------------------------
def test_train_saes_recipe_invariants(trained):
    saes, facts, fvus = trained
    assert set(saes) == {0, 1}
    assert facts["tokens_seen"] == 2048 and facts["steps"] == 8
    for layer, sae in saes.items():
        assert (sae.d_in, sae.d_sae, sae.cfg.k, sae.cfg.hook_layer) == (D_MODEL, 4 * D_MODEL, 4, layer)
        assert sae.cfg.activation == "topk" and sae.cfg.apply_b_dec_to_input
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))
        assert sae.b_dec.abs().sum() > 0  # initialised at the mean of the first buffer
        per_step = [f for lay, f in fvus if lay == layer]
        assert len(per_step) == 8
        assert per_step[-1] < 0.9 * per_step[0]


def test_first_step_starts_from_the_recipe_init(tiny_lm: LoadedModel, monkeypatch):
    original = TopKTrainer.train_batch
    checked: list[int] = []

    def check_first_step(self: TopKTrainer, x: torch.Tensor) -> None:
        sae = self.to_sae()
        # Encoder = decoder transpose, unit-norm decoder rows, zero encoder bias, before any step.
        assert torch.equal(sae.W_enc, sae.W_dec.T) and torch.equal(sae.b_enc, torch.zeros(sae.d_sae))
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))
        original(self, x)
        # b_dec = mean of the first batch (lr 1e-12: the Adam step itself moves nothing visibly).
        torch.testing.assert_close(self.to_sae().b_dec.detach(), x.mean(dim=0), rtol=0, atol=1e-6)
        checked.append(self.layer)
        raise KeyboardInterrupt

    monkeypatch.setattr(TopKTrainer, "train_batch", check_first_step)
    with pytest.raises(KeyboardInterrupt):
        train_saes(tiny_lm, TEXTS, replace(CFG, lr=1e-12, layers=(1,)), progress=False)
    assert checked == [1]


def test_train_saes_is_deterministic(tiny_lm: LoadedModel, trained):
    again, _ = train_saes(tiny_lm, TEXTS, CFG, progress=False)
    _assert_same(trained[0], again)
    other, _ = train_saes(tiny_lm, TEXTS, replace(CFG, seed=1), progress=False)
    assert not torch.equal(other[0].W_dec, again[0].W_dec)


def test_train_saes_rejects_empty_and_too_small_corpora(tiny_lm: LoadedModel):
    with pytest.raises(SaealignError, match="corpus is empty"):
        train_saes(tiny_lm, [], CFG, progress=False)
    # One content token a text (after <s>), 26 passes over 10 texts: 260 tokens fill one batch of 256.
    with pytest.raises(SaealignError, match="corpus ran out after 256 tokens"):
        train_saes(tiny_lm, ["cat"] * 10, CFG, progress=False)


# -- checkpoints ----------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tiny_lm: LoadedModel, trained, tmp_path: Path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    original = TopKTrainer.train_batch

    def dies_mid_second_buffer(self: TopKTrainer, x: torch.Tensor) -> None:
        if self.step == 4:  # the first buffer held 3 steps: this is inside the second
            raise _Killed
        original(self, x)

    with monkeypatch.context() as mp:
        mp.setattr(TopKTrainer, "train_batch", dies_mid_second_buffer)
        with pytest.raises(_Killed):
            train_saes(tiny_lm, TEXTS, CFG, checkpoint_dir=ckpt, progress=False)
    state = load_checkpoint(ckpt)
    assert state is not None and state["trainers"][0]["step"] == 3 and state["tokens_seen"] == 3 * 256
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no half-written temporary folders

    resumed, facts = train_saes(tiny_lm, TEXTS, CFG, checkpoint_dir=ckpt, progress=False)
    _assert_same(trained[0], resumed)
    assert facts["tokens_seen"] == 2048

    # A finished run's checkpoint returns the same SAEs without reading any text.
    def no_stream(*_a: object, **_k: object):  # noqa: ANN202
        raise AssertionError("a finished run must not stream activations")

    monkeypatch.setattr(train, "activation_stream", no_stream)
    finished, _ = train_saes(tiny_lm, TEXTS, CFG, checkpoint_dir=ckpt, progress=False)
    _assert_same(trained[0], finished)


def test_checkpoint_of_another_config_is_refused(tiny_lm: LoadedModel, tmp_path: Path):
    cfg = replace(CFG, tokens=256, layers=(0,))
    train_saes(tiny_lm, TEXTS, cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(SaealignError, match="another training config") as err:
        train_saes(tiny_lm, TEXTS, replace(cfg, k=5), checkpoint_dir=tmp_path, progress=False)
    assert "\n" not in str(err.value)


# -- the activation stream --------------------------------------------------------------------------------
def test_activation_stream_leaves_out_first_position_and_special_tokens(tiny_lm: LoadedModel):
    texts = [
        "the cat sat",  # <s> the cat sat: 3
        "a dog </s> runs fast",  # </s> is special: 4
        "zebra cat",  # zebra -> <unk>, special: 1
        " ".join(["sun"] * 40),  # truncated to 8 ids, <s> first: 7
    ]
    cfg = replace(CFG, max_seq_len=8, buffer_tokens=10_000)
    chunks = list(activation_stream(tiny_lm, texts, cfg))
    assert len(chunks) == 1
    acts, consumed = chunks[0]
    assert consumed == 4
    assert set(acts) == {0, 1}
    assert acts[0].shape == acts[1].shape == (3 + 4 + 1 + 7, D_MODEL)
    assert acts[0].dtype == torch.float32


def test_activation_stream_rows_are_the_residual_stream(tiny_lm: LoadedModel):
    text = "the big dog runs over the river"
    (acts, _), = activation_stream(tiny_lm, [text], CFG)
    ids = tiny_lm.tokenizer(text, return_tensors="pt")["input_ids"]
    for layer in (0, 1):
        assert torch.equal(acts[layer], residuals_at(tiny_lm.model, layer, ids)[0, 1:])


def test_activation_stream_chunks_end_on_text_boundaries(tiny_lm: LoadedModel):
    cfg = replace(CFG, buffer_tokens=100, batch_tokens=64, text_batch=2)  # groups of 16 texts, one group a chunk
    chunks = list(activation_stream(tiny_lm, TEXTS, cfg))
    assert [c for _, c in chunks] == [16, 32, 48, 60]
    resumed = list(activation_stream(tiny_lm, TEXTS, cfg, start_text=32))
    assert [c for _, c in resumed] == [48, 60]
    for (a, _), (b, _) in zip(chunks[2:], resumed, strict=True):
        assert torch.equal(a[1], b[1])
    total = sum(a[0].shape[0] for a, _ in chunks)
    assert total == sum(a[0].shape[0] for a, _ in activation_stream(tiny_lm, TEXTS, replace(cfg, buffer_tokens=10**6)))


# -- evaluation ------------------------------------------------------------------------------------------
def _exact_sae(d: int) -> SAE:
    """x = relu(x) - relu(-x), plus d latents that never fire (zero encoder, negative bias)."""
    eye = torch.eye(d)
    w_enc = torch.cat([eye, -eye, torch.zeros(d, d)], dim=1)
    b_enc = torch.cat([torch.zeros(2 * d), -torch.ones(d)])
    w_dec = torch.cat([eye, -eye, torch.randn(d, d, generator=torch.Generator().manual_seed(0))])
    cfg = SAEConfig(d_in=d, d_sae=3 * d, activation="relu", apply_b_dec_to_input=False)
    return SAE(cfg, W_enc=w_enc, b_enc=b_enc, W_dec=w_dec).requires_grad_(False)


def test_evaluate_sae_of_an_exact_sae(tiny_lm: LoadedModel):
    texts = make_texts(6, seed=3, min_words=3, max_words=12)
    q = evaluate_sae(tiny_lm, _exact_sae(D_MODEL), 0, texts, batch=4, progress=False)
    n_words = sum(len(t.split()) for t in texts)  # every word is one content token (after <s>)
    assert q.tokens == n_words
    assert q.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert q.explained_variance_no_outliers == pytest.approx(1.0, abs=1e-6)
    assert abs(q.ce_increase) < 1e-4
    assert q.dead_fraction == pytest.approx(1 / 3)
    assert q.l0 == D_MODEL  # one of each +/- pair fires for every nonzero coordinate
    assert 0 <= q.outlier_fraction < 0.5

    # CE: the model's own mean next-token loss, text by text (no padding involved).
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tiny_lm.tokenizer(t, return_tensors="pt")["input_ids"]
            nll += float(tiny_lm.model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert q.ce_clean == pytest.approx(nll / n, rel=1e-5)


def test_evaluate_sae_of_a_zero_sae(tiny_lm: LoadedModel):
    sae = SAE(SAEConfig(d_in=D_MODEL, d_sae=8, activation="relu")).requires_grad_(False)
    texts = make_texts(4, seed=4)
    q = evaluate_sae(tiny_lm, sae, 1, texts, progress=False)
    assert q.l0 == 0 and q.dead_fraction == 1
    # Reconstructing 0: EV = 1 - sum |x|^2 / sum |x - mean|^2 over the content tokens.
    x = torch.cat([
        residuals_at(tiny_lm.model, 1, tiny_lm.tokenizer(t, return_tensors="pt")["input_ids"])[0, 1:] for t in texts
    ])
    assert q.tokens == x.shape[0]
    expected = 1 - x.pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    assert q.explained_variance == pytest.approx(float(expected), rel=1e-4)


# -- train_and_save and the CLI ----------------------------------------------------------------------------
def test_train_and_save_writes_loadable_saelens_folders(tiny_lm: LoadedModel, trained, tmp_path: Path):
    recipe = {"model": "tiny", "corpus": "synthetic"}
    qualities = train_and_save(tiny_lm, TEXTS, make_texts(5, seed=9), CFG, tmp_path / "out", recipe, progress=False)
    assert set(qualities) == {0, 1}
    for layer in (0, 1):
        sae = load_sae(tmp_path / "out" / f"layer_{layer}")
        assert sae.dtype == torch.bfloat16 and sae.cfg.hook_layer == layer
        assert torch.equal(sae.W_dec, trained[0][layer].W_dec.to(torch.bfloat16))
        meta = sae.cfg.metadata
        assert meta["recipe"]["model"] == "tiny" and meta["recipe"]["corpus"] == "synthetic"
        assert meta["recipe"]["tokens"] == 2048 and meta["recipe"]["layers"] == [0, 1]
        assert meta["recipe"]["lr_used"] == 1e-2
        assert meta["held_out"]["explained_variance"] == qualities[layer].explained_variance
        assert meta["training"]["steps"] == 8
        raw = json.loads((tmp_path / "out" / f"layer_{layer}" / "cfg.json").read_text())
        assert raw["hook_name"] == f"blocks.{layer}.hook_resid_post" and raw["architecture"] == "topk"
    summary = json.loads((tmp_path / "out" / "training.json").read_text())
    assert set(summary["held_out"]) == {"0", "1"}


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-model"
    make_llama().save_pretrained(folder)
    make_tokenizer(with_pad=False).save_pretrained(folder)
    return folder


def test_cli_train_sae(model_folder: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_texts(40, seed=5)) + "\n")
    out = tmp_path / "saes"
    args = ["train-sae", "--model", str(model_folder), "--corpus", str(corpus), "--layers", "1", "--out", str(out),
            "--tokens", "4096", "--expansion", "2", "--k", "4", "--checkpoint-dir", str(tmp_path / "ckpt")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "training on 38 texts, evaluating on 2 held-out texts" in result.output
    assert "layer 1: " in result.output
    sae = load_sae(out / "layer_1")
    assert (sae.d_in, sae.d_sae, sae.cfg.k) == (D_MODEL, 2 * D_MODEL, 4)
    assert sae.cfg.metadata["recipe"]["corpus_texts"] == 40


@pytest.mark.parametrize(("layers", "message"), [("x", "give layers as integers"), ("", "at least one layer")])
def test_cli_train_sae_bad_layers_is_one_line(model_folder: Path, tmp_path: Path, layers: str, message: str):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat\n")
    args = ["train-sae", "--model", str(model_folder), "--corpus", str(corpus), "--layers", layers,
            "--out", str(tmp_path / "saes")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # a clean click exit, not a traceback
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "saes").exists()
