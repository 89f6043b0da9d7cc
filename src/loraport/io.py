"""Atomic output directories: a failure never leaves a half-written result behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraportError


def check_output_dir(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Fail early (before any work) if ``path`` exists and ``overwrite`` is off."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise LoraportError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise LoraportError(f"{out}: exists and is not a directory")
    return out


@contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``.

    On any exception the temporary directory is removed and ``path`` is left untouched.
    An existing ``path`` is only replaced when ``overwrite`` is true.

    Example::

        with atomic_directory("out/adapter", overwrite=True) as tmp:
            save_adapter(adapter, tmp)
    """
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, backup / out.name)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Fail early (before any work) if the file ``path`` exists and ``overwrite`` is off, or is a directory."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise LoraportError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.is_dir():
        raise LoraportError(f"{out}: is a directory, expected a file path")
    return out


@contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path`` (as :func:`atomic_directory`)."""
    out = check_output_file(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file via a temporary file and rename."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def default_cache_dir() -> Path:
    """``$LORAPORT_CACHE``, else ``$XDG_CACHE_HOME/loraport/subspaces`` (``~/.cache/...``)."""
    env = os.environ.get("LORAPORT_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "loraport" / "subspaces"
