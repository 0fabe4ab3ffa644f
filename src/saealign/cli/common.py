"""What every ``saealign`` command shares: one-line errors, the stack options, list parsing, the workbench.

User mistakes surface as one line (``SaealignError`` -> ``click.ClickException``), never a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from saealign.errors import SaealignError

if TYPE_CHECKING:
    from saealign.evaluate.workbench import Loader, Workbench
    from saealign.steering.aligner import Aligner

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn SaealignError (and a missing file) into one clean error line with exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SaealignError as e:
            raise click.ClickException(str(e)) from None
        except FileNotFoundError as e:
            raise click.ClickException(f"file not found: {e.filename}") from None

    return wrapper  # type: ignore[return-value]


def parse_layers(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layers as integers separated by commas, e.g. 6,15") from None


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """``0,1,2`` or ranges with both ends included (``24-55``), mixed (``0,3,8-11``); each seed once."""
    seeds: list[int] = []
    try:
        for item in text.split(","):
            first, _, last = item.strip().partition("-")
            low, high = int(first), int(last or first)
            if high < low:
                raise ValueError(item)
            seeds += range(low, high + 1)
    except ValueError:
        raise SaealignError(f"{option} takes non-negative integers or ranges separated by commas (e.g. 0,1,2 or "
                            "24-55)") from None
    if len(set(seeds)) != len(seeds):
        raise SaealignError(f"{option} names a seed twice: {text!r}")
    return tuple(seeds)


def parse_strengths(text: str, method: str = "swap") -> tuple[float | str, ...]:
    """``--strengths``: numbers within the method's range and/or ``auto``, separated by commas."""
    from saealign.steering.spec import parse_strength

    out: list[float | str] = []
    for s in text.split(","):
        try:
            out.append(parse_strength(s.strip(), method))
        except SaealignError as e:
            raise SaealignError(f"--strengths takes numbers or auto separated by commas, got {s.strip()!r}: {e}") from None
    return tuple(dict.fromkeys(out))


def parse_choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Comma-separated names, each one of ``allowed`` (an empty text gives none)."""
    found = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in found if t not in allowed]
    if bad:
        raise SaealignError(f"unknown {what} {', '.join(bad)}: use some of {', '.join(allowed)}")
    return found


# -- which model, SAE, layer and reference index -------------------------------------------------------
def stack_options(fn: F) -> F:
    """--model/--sae/--layer/--index/--corpus/--max-prompts, shared by index, score, generate and serve."""
    from saealign.defaults import DEFAULT_INDEX_PROMPTS

    options = [
        click.option("--model", default="default", show_default=True, help="default, gemma3-270m, folder, .gguf or hub id"),
        click.option("--sae", "sae_spec", default="default", show_default=True, help="default[:LAYER], SAELens folder, params.npz, .pt, or a preset "
                     "(gpt2-small-oai-v5-32k:LAYER, with its model; needs the hub)"),
        click.option("--layer", type=int, default=None, help="block the SAE reads (default: the SAE's own, else 15)"),
        click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None, help="an existing index folder"),
        click.option("--corpus", "corpus_spec", default=None, help="reference corpus spec (default: WordNet sample)"),
        click.option("--max-prompts", default=DEFAULT_INDEX_PROMPTS, show_default=True, help="stratified sample size of the corpus"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_aligner(model: str, sae_spec: str, layer: int | None, index_dir: Path | None, corpus_spec: str | None,
                 max_prompts: int) -> Aligner:
    """The stack the options name: model, SAE at its layer, reference index (built once, cached) and embedder.

    An SAE preset (``--sae gpt2-small-oai-v5-32k:9``) brings its model when ``--model`` is left at default,
    and any failure to fetch them says that the preset needs the hub.
    """
    from saealign.defaults import default_companions, load_stack
    from saealign.sae.presets import find_preset, hub_needed
    from saealign.steering.aligner import Aligner

    preset = find_preset(sae_spec)
    if preset is None:
        return Aligner(*load_stack(model, sae_spec, layer, index_dir, corpus_spec, max_prompts),
                       companions=default_companions(model, sae_spec, layer))
    if model == "default":
        model = preset[0].model
    try:
        return Aligner(*load_stack(model, sae_spec, layer, index_dir, corpus_spec, max_prompts))
    except SaealignError as e:
        if "hub" in str(e) or "connect" in str(e):
            raise hub_needed(*preset, why="it cannot be reached from here") from e
        raise


def read_topic_texts(topic_files: tuple[str, ...], topic_texts: tuple[str, ...]) -> list[str]:
    from saealign.reference.text_files import read_topic

    if not topic_files and not topic_texts:
        raise SaealignError("give the topic: --topic-file FILE (one example text a line) and/or --topic TEXT")
    return read_topic(list(topic_files), list(topic_texts))


def read_prompts_file(path: Path) -> list[str]:
    """``--prompts-file``: one prompt a line, blank lines skipped, duplicates kept (each line is one generation)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SaealignError(f"prompts file {path} not found: give a text file with one prompt a line") from None
    except OSError as e:
        raise SaealignError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    prompts = []
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SaealignError(f"prompts file {path} line {number} is not UTF-8: save the file as UTF-8") from None
        if line:
            prompts.append(line)
    if not prompts:
        raise SaealignError(f"prompts file {path} has no prompts: put one prompt a line")
    return prompts


def json_line(obj: Any) -> str:
    """Standard JSON on one line (NaN and infinities become null: :mod:`saealign.jsonio`)."""
    from saealign.jsonio import standard

    return standard(obj)


# -- the evaluation's shared data and workbench --------------------------------------------------------
data_option = click.option("--data", type=click.Path(path_type=Path), default=None,
                           help="shared data folder (default ../shared/data)")


def data_dir(data: Path | None) -> Path:
    from saealign.defaults import shared_data_dir

    found = data or shared_data_dir()
    if found is None or not found.is_dir():
        raise SaealignError("the evaluation needs the shared data folder: pass --data DIR (holding reference/ and topics/)")
    return found


def workbench(data: Path | None, max_train: int | None = None, need_data: bool = True) -> Workbench:
    """The workbench of one ``eval`` command: the embedded defaults, or the :class:`Loader` a caller passed as
    click's context object (``main(obj=loader)``, as tests do with tiny models)."""
    from saealign.evaluate.workbench import DefaultLoader, Workbench

    ctx = click.get_current_context(silent=True)
    loader: Loader = ctx.obj if ctx is not None and ctx.obj is not None else DefaultLoader()
    return Workbench(data_dir(data) if need_data else data, loader, acceptability_max_train=max_train)
