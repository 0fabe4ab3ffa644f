"""The SAE interface every part of saealign uses: ``pre`` -> ``activate`` -> ``decode``.

One class covers the three activation families of public SAEs:

- ``topk``: keep the k largest pre-activations, ReLU them (OpenAI/Gao et al. 2024, sparsify);
- ``jumprelu``: keep ``γ_i`` where ``γ_i > θ_i`` (Gemma Scope);
- ``relu``: plain ReLU (Anthropic-style, most SAELens SAEs).

Input conventions differ between formats, so two switches reproduce each format's own formula:

- ``apply_b_dec_to_input``: subtract ``b_dec`` before encoding (OpenAI's ``pre_bias``, SAELens
  ``apply_b_dec_to_input``);
- ``normalize_input="layer_norm"``: OpenAI's TopK GPT-2 SAEs standardise each input vector
  (``(x - mean) / (std + eps)``) before encoding and undo it after decoding, so ``decode`` needs
  the original ``x`` to restore its mean and scale.

Loaders for the file formats live in :mod:`saealign.sae.formats`; this module owns the maths and
the SAELens folder layout written by :meth:`SAE.save`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from saealign.cache import atomic_dir
from saealign.errors import SaealignError

Activation = Literal["topk", "jumprelu", "relu"]
InputNorm = Literal["none", "layer_norm"]

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"

_LN_EPS = 1e-5  # OpenAI sparse_autoencoder.model.LN default


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is and where it attaches. Serialised as SAELens ``cfg.json`` (plus our keys)."""

    d_in: int
    """Width of the residual stream it reads (the model's hidden size)."""
    d_sae: int
    """Number of latents."""
    activation: Activation = "topk"
    """Activation family: topk, jumprelu or relu."""
    k: int | None = None
    """Active latents per token for ``topk`` SAEs."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding (OpenAI ``pre_bias``)."""
    normalize_input: InputNorm = "none"
    """``layer_norm``: standardise inputs per token and undo it on decode (OpenAI TopK GPT-2)."""
    model_name: str = ""
    """The model it was trained on (informational; width is what is checked)."""
    hook_layer: int | None = None
    """Block index whose output (residual stream after the block) it reads."""
    hook_name: str = ""
    """SAELens hook name, e.g. ``blocks.6.hook_resid_post``."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form facts: training recipe, held-out figures, source format."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SaealignError(f"SAE widths must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.activation not in ("topk", "jumprelu", "relu"):
            raise SaealignError(f"unknown SAE activation {self.activation!r}: use topk, jumprelu or relu")
        if self.activation == "topk" and (self.k is None or not 0 < self.k <= self.d_sae):
            raise SaealignError(f"a topk SAE needs 0 < k <= d_sae, got k={self.k}")
        if self.normalize_input not in ("none", "layer_norm"):
            raise SaealignError(f"unknown normalize_input {self.normalize_input!r}: use none or layer_norm")


class SAE(nn.Module):
    """A sparse autoencoder ``x -> γ = pre(x) -> a = σ(γ) -> x̂ = a·W_dec + b_dec``.

    Weights: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``
    and, for JumpReLU, ``threshold [d_sae]``.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        W_enc: Tensor | None = None,
        b_enc: Tensor | None = None,
        W_dec: Tensor | None = None,
        b_dec: Tensor | None = None,
        threshold: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae) if W_enc is None else W_enc.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae) if b_enc is None else b_enc.clone())
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in) if W_dec is None else W_dec.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in) if b_dec is None else b_dec.clone())
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae) if threshold is None else threshold.clone())
        else:
            self.register_parameter("threshold", None)
        shapes = {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
        }
        for name, shape in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise SaealignError(f"SAE weight {name} has shape {got}, expected {shape} from its config")
        if self.threshold is not None and tuple(self.threshold.shape) != (d_sae,):
            raise SaealignError(f"SAE threshold has shape {tuple(self.threshold.shape)}, expected ({d_sae},)")

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # -- the maths ---------------------------------------------------------------------------
    def _standardise(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """OpenAI's LN: ``(x - mu) / (std + eps)`` per vector; returns (x_norm, mu, std)."""
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        return xc / (std + _LN_EPS), mu, std

    def pre(self, x: Tensor) -> Tensor:
        """Pre-activations γ. ``x: [..., d_in] -> [..., d_sae]`` (computed in the SAE's dtype)."""
        x = x.to(self.dtype)
        if self.cfg.normalize_input == "layer_norm":
            x = self._standardise(x)[0]
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """σ(γ): ``[..., d_sae] -> [..., d_sae]``, dense with zeros for inactive latents."""
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        if self.cfg.activation == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold)
        assert self.cfg.k is not None
        top = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))

    def encode(self, x: Tensor) -> Tensor:
        """Post-activations ``a = σ(pre(x))``: ``[..., d_in] -> [..., d_sae]``."""
        return self.activate(self.pre(x))

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction ``acts·W_dec + b_dec``: ``[..., d_sae] -> [..., d_in]``.

        ``x`` (the encoded input) is required by ``layer_norm`` SAEs to restore its mean and scale.
        """
        out = acts.to(self.dtype) @ self.W_dec + self.b_dec
        if self.cfg.normalize_input == "layer_norm":
            if x is None:
                raise ValueError("this SAE standardises its input: pass the encoded x to decode()")
            _, mu, std = self._standardise(x.to(self.dtype))
            out = out * std + mu  # OpenAI and SAELens undo the LN without eps
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x), x)``: ``[..., d_in] -> [..., d_in]``."""
        return self.decode(self.encode(x), x)

    # -- persistence (SAELens folder layout) ------------------------------------------------
    def state_for_saving(self) -> dict[str, Tensor]:
        tensors = {n: getattr(self, n).detach().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold.detach().contiguous()
        return tensors

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) atomically."""
        folder = Path(folder)
        tensors = self.state_for_saving()
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / CFG_FILE).write_text(json.dumps(saelens_cfg(self.cfg, tensors["W_enc"].dtype), indent=2) + "\n")
        return folder


def sae_key(sae: SAE) -> str:
    """Short content hash of an SAE's weights and config: what scores and indexes are keyed by.

    The weights are hashed at bf16 precision, so the key does not depend on the dtype the SAE was loaded
    in (the shipped bf16 SAEs run in fp32 on CPUs without native bf16 and in bf16 elsewhere, and an
    index built on one machine must be found on the other).
    """
    h = hashlib.sha256(json.dumps(asdict(sae.cfg) | {"metadata": None}, sort_keys=True, default=str).encode())
    for name, t in sae.state_for_saving().items():
        h.update(name.encode())
        h.update(t.detach().to(torch.bfloat16).float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def saelens_cfg(cfg: SAEConfig, dtype: torch.dtype) -> dict[str, Any]:
    """SAELens-compatible ``cfg.json`` keys, plus saealign's own (``k``, ``normalize_input``...)."""
    architecture = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[cfg.activation]
    out: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "activation_fn_str": "topk" if cfg.activation == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if cfg.activation == "topk" else {},
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "layer_norm" if cfg.normalize_input == "layer_norm" else "none",
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name or (f"blocks.{cfg.hook_layer}.hook_resid_post" if cfg.hook_layer is not None else ""),
        "hook_layer": cfg.hook_layer,
        "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "saealign": asdict(cfg),
    }
    # SAELens 6 reads k at the top level and the model facts under "metadata"; older versions read the
    # keys above. Writing both keeps every version loading the same SAE (tests/test_saelens_interop.py).
    if cfg.activation == "topk":
        out["k"] = cfg.k
    out["metadata"] = {"model_name": cfg.model_name, "hook_name": out["hook_name"]}
    return out
