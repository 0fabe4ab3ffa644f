"""Where saealign keeps what it computes once (converted models, indexes), and how it writes safely.

The cache root is ``$SAEALIGN_CACHE`` if set, else ``$XDG_CACHE_HOME/saealign``, else
``~/.cache/saealign``. Every folder is written under a temporary name and renamed into place,
so an interrupted write never leaves a half-written entry that a later run would trust, and a write
never deletes a file that saealign did not create (see :func:`atomic_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saealign.errors import SaealignError


def cache_root() -> Path:
    """The user cache folder for saealign (created on demand)."""
    env = os.environ.get("SAEALIGN_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "saealign"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A sub-folder of the cache root (not created: callers write it atomically)."""
    return cache_root().joinpath(*parts)


OWNED_FILE = ".saealign-owned.json"
"""Written last into every folder :func:`atomic_dir` makes: the files saealign put there. A later write
replaces such a folder only while it holds nothing else, so a user's own files are never deleted."""

_SHOWN = 3  # foreign files named in the refusal


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success swap it in under the name ``final``.

    Nothing saealign did not write is ever deleted: ``final`` may be missing, an empty folder or a
    folder saealign wrote earlier (its :data:`OWNED_FILE` lists every file and nothing else is
    there). Anything else (a file, a link, a folder holding other files) is refused with one
    :class:`SaealignError` line before the caller's work starts. The old folder is swapped out by a
    rename (one atomic exchange where the system has ``renameat2``), so readers see the old entry or
    the new one, never a mix. On any exception the temporary folder is removed and ``final`` is left
    untouched.
    """
    final = _output_path(final)
    check_replaceable(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise SaealignError(f"cannot write {final}: {e.strerror or e}") from e
    try:
        yield tmp
        _record_owned(tmp)
        check_replaceable(final)  # again: someone may have put files there while the work ran
        try:
            _swap_in(tmp, final)
        except OSError as e:
            raise SaealignError(f"cannot write {final}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(final: Path) -> None:
    """Raise one :class:`SaealignError` line unless :func:`atomic_dir` may write the folder ``final``.

    Callers that do long work before writing (scoring, training) call this first, so a refused
    output path costs nothing.
    """
    final = _output_path(final)
    if final.is_symlink():
        raise SaealignError(f"{final} is a symbolic link: give a folder path (saealign does not replace links)")
    if not final.exists():
        if final.parent.exists() and not final.parent.is_dir():
            raise SaealignError(f"cannot write {final}: {final.parent} is a file, not a folder")
        return
    if not final.is_dir():
        raise SaealignError(f"{final} is a file, not a folder: saealign writes a folder there; give a new folder path")
    foreign = foreign_files(final)
    if foreign:
        more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
        raise SaealignError(
            f"{final} already holds files saealign did not write ({', '.join(foreign[:_SHOWN])}{more}): "
            "give a new or empty folder, or move them away first"
        )


def foreign_files(folder: Path) -> list[str]:
    """Files (and links) under ``folder`` that its :data:`OWNED_FILE` does not list, as sorted relative paths."""
    try:
        owned = set(json.loads((folder / OWNED_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        owned = set()  # no record (or a damaged one): every file counts as the user's
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        links = [d for d in dirs if (base / d).is_symlink()]  # os.walk lists links to folders as folders
        for name in (*files, *links):
            rel = (base / name).relative_to(folder).as_posix()
            if rel != OWNED_FILE and rel not in owned:
                found.append(rel)
    return sorted(found)


def _output_path(final: Path | str) -> Path:
    # abspath resolves "." and "..": `-o .` must be judged as the working folder, by its real name
    path = Path(os.path.abspath(Path(final).expanduser()))
    if not path.name:
        raise SaealignError(f"cannot write a folder at {path}: give a folder below it")
    cwd = Path.cwd()
    if path == cwd or path in cwd.parents:
        raise SaealignError(f"{path} is the working folder or holds it: give a new folder path for the output")
    return path


def _record_owned(tmp: Path) -> None:
    files = sorted(
        p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() or p.is_symlink()
    )
    (tmp / OWNED_FILE).write_text(json.dumps({"written_by": "saealign", "files": files}, indent=1) + "\n")


def _swap_in(tmp: Path, final: Path) -> None:
    """Put the folder ``tmp`` at ``final``; an old folder there (already checked) is swapped out and removed."""
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp)  # tmp now holds the old folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, old)  # replaces the empty placeholder
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # this file system cannot exchange: the caller renames twice
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to the file ``path`` through a uniquely named temporary file and a rename.

    Refuses (one line) a folder or a link to a folder at ``path``: replacing a file is this function's
    job, replacing a folder never is.
    """
    if path.is_dir():
        raise SaealignError(f"{path} is a folder, not a file: give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise SaealignError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise SaealignError(f"cannot write {path}: {e.strerror or e}") from e
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex, first 16 characters are plenty for cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def hash_json(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
