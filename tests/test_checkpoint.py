"""Training checkpoints hold tensors and plain values only: exact round trips, and nothing is unpickled."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch

from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.sae.checkpoint import LEGACY_FILE, META_FILE, TENSORS_FILE, load_checkpoint, save_checkpoint
from saealign.sae.train_config import TrainConfig
from saealign.sae.training import train_saes

SRC = Path(__file__).resolve().parent.parent / "src" / "saealign"


def same(a: object, b: object) -> bool:
    """Same structure, types, values and tensors (dtype, shape and bits)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_nested_state_round_trips_exactly(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "trainers": {6: {"params": [torch.randn(3, 4, generator=g), torch.randn(4, generator=g).bfloat16()]},
                     15: {"step": 7, "ok": True}},
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, generator=g)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "foreach": None, "params": [0]}]},
        "rng": torch.Generator().manual_seed(5).get_state(),
        "counts": torch.arange(5),
        "config": {"layers": (6, 15), "lr": None, "ratio": 1 / 3},
        "$odd key": "kept",
    }
    save_checkpoint(tmp_path / "ck", state)
    back = load_checkpoint(tmp_path / "ck")
    assert same(back, state)


def test_adam_resumes_bit_identically(tmp_path: Path) -> None:
    def run(steps: range, w0: torch.Tensor, opt_state: dict | None = None):  # noqa: ANN202
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.Adam([w], lr=0.1)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for i in steps:
            opt.zero_grad()
            (w * torch.arange(4.0) * (i + 1)).pow(2).sum().backward()
            opt.step()
        return w.detach(), opt

    straight, _ = run(range(4), torch.ones(4))
    half, opt = run(range(2), torch.ones(4))
    save_checkpoint(tmp_path / "ck", {"w": half, "opt": opt.state_dict()})
    state = load_checkpoint(tmp_path / "ck")
    assert state is not None
    resumed, _ = run(range(2, 4), state["w"], state["opt"])
    assert torch.equal(resumed, straight)
    cold, _ = run(range(2, 4), state["w"])  # without the optimiser state the run differs: the test can fail
    assert not torch.equal(cold, straight)


class _Payload:
    """Unpickling this runs ``touch(path)``: what a planted checkpoint.pt could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def test_planted_pickle_checkpoint_is_never_loaded(tiny_lm: LoadedModel, tmp_path: Path) -> None:
    ckpt, ran = tmp_path / "ckpt", tmp_path / "code_ran"
    ckpt.mkdir()
    torch.save({"config": {}, "evil": _Payload(ran)}, ckpt / LEGACY_FILE)
    with pytest.raises(SaealignError) as err:
        train_saes(tiny_lm, ["the cat sat"] * 8, TrainConfig(layers=(0,), tokens=256, batch_tokens=256,
                                                              buffer_tokens=256), checkpoint_dir=ckpt, progress=False)
    assert not ran.exists()
    message = str(err.value)
    assert "\n" not in message and "pickle" in message and "could run code" in message
    # and the proof that the payload is live: unpickling it does run code
    pickle.loads(pickle.dumps(_Payload(ran)))
    assert ran.exists()


@pytest.mark.parametrize("damage", ["truncate", "json", "format"])
def test_damaged_checkpoint_is_one_line(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "ck"
    save_checkpoint(folder, {"w": torch.ones(3), "step": 1})
    if damage == "truncate":
        data = (folder / TENSORS_FILE).read_bytes()
        (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "json":
        (folder / META_FILE).write_text("{not json")
    else:
        (folder / META_FILE).write_text(json.dumps({"format": "other", "state": {}}))
    with pytest.raises(SaealignError, match="delete the folder to start over") as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value)


def test_empty_folder_has_no_checkpoint(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def test_no_unpickling_in_the_package() -> None:
    """Every torch.load in saealign passes weights_only=True (tensors and plain containers only), and no
    module imports pickle, dill or joblib or lets numpy unpickle."""
    loads = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "joblib", "cloudpickle"} & {str(n).split(".")[0] for n in names}, path
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if func == "torch.load":
                    loads.append(path.name)
                    assert kwargs.get("weights_only") == "True", f"{path}: torch.load without weights_only=True"
                if func.endswith(("np.load", "numpy.load")):
                    assert kwargs.get("allow_pickle", "False") == "False", f"{path}: np.load(allow_pickle=True)"
    assert loads == ["openai_checkpoint.py"]  # OpenAI's .pt SAEs, read with the allow-list loader
