"""Lazy, one-tensor-at-a-time reader for base-model checkpoints.

A :class:`Checkpoint` reads ``config.json`` and the tensor index of a model directory
(single or sharded safetensors, or pickle ``.bin`` files loaded with ``weights_only=True``)
without loading any weights. Tensors are read on demand with :meth:`Checkpoint.get`.

Example::

    >>> ckpt = Checkpoint.open("Qwen/Qwen2.5-1.5B")          # doctest: +SKIP
    >>> ckpt.shape("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    (1536, 1536)
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import CheckpointError
from .files import BinFile, SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# diffusers names the weights of its model folders (unet/, vae/, ...) differently.
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_ADAPTER_FILES = {"adapter_model.safetensors", "adapter_model.bin"}
# Files a model directory needs beside its weights: config, generation config, tokenizer.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "*.model",
    "chat_template.*",
)


# Readers of single-file formats, in the order they are tried: ``(find, reader)`` where
# ``find(path)`` returns the file ``path`` names in that format (or ``None``) and
# ``reader(file, name)`` opens it. Each such reader registers itself when its module is
# imported (the package imports them all), so this module imports no reader.
FILE_FORMATS: list[tuple[Callable[[Path], Path | None], Callable[[Path, str], Checkpoint]]] = []


class TensorSource(Protocol):
    """What base weights are read from: a :class:`Checkpoint`, or a renamed view of one.

    ``get`` reads one tensor (only rows ``[start, stop)`` if given); ``fingerprint``
    changes whenever the tensor's bytes may have (it keys the subspace cache);
    ``file_of`` names the file for error messages.
    """

    name: str

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def fingerprint(self, key: str) -> str: ...

    def file_of(self, key: str) -> Path: ...


def resolve_model_dir(name_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """Return a local directory for a model given as a directory or a Hugging Face hub id.

    Hub ids are looked up in the local hub cache first (works offline, ``HF_HUB_OFFLINE=1``);
    only when they are absent and the hub is reachable are the config and weight files
    downloaded (no code, never ``trust_remote_code``).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_local = text.startswith((".", "/", "~")) or path.exists() or text.count("/") > 1
    if looks_local:
        raise CheckpointError(f"{text}: model directory not found")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{text}: not a directory and huggingface_hub is not installed") from exc
    patterns = ["*.json", "*.safetensors"]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(f"{text}: not a local directory and not in the Hugging Face cache (offline mode)")
    try:
        local = Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(text, revision=revision, allow_patterns=["*.json", "*.bin"]))
        return local
    except Exception as exc:
        raise CheckpointError(
            f"{text}: not a local directory, not in the Hugging Face cache, and download failed ({type(exc).__name__})"
        ) from exc


class Checkpoint:
    """A base model on disk whose tensors are read lazily, one at a time.

    Attributes:
        root: the model directory (or a single ``.safetensors`` file).
        name: what the user passed (directory or hub id), used in messages and in
            ``base_model_name_or_path`` of written adapters.
        config: the parsed ``config.json`` (empty dict if the directory has none).
    """

    def __init__(self, root: Path, name: str | None = None) -> None:
        self.root = Path(root)
        self.name = name if name is not None else str(root)
        self._stack = ExitStack()
        self._handles: dict[Path, SafetensorsFile | BinFile] = {}
        self._key_cache: dict[str, str | None] = {}
        self._fingerprints: dict[str, str] = {}
        self.config: dict[str, Any] = self._read_config()
        self._weight_map: dict[str, Path] = self._read_index()

    @classmethod
    def open(cls, name_or_path: str | os.PathLike[str], revision: str | None = None) -> Checkpoint:
        """Open a model directory, a hub id (see :func:`resolve_model_dir`), or a GGUF file.

        A ``.gguf`` file, or a directory whose only weights are one ``.gguf`` file, opens as a
        :class:`~loraport.checkpoints.gguf.GGUFCheckpoint` (same interface, tensors dequantized
        to float32 and named as ``transformers`` names them).
        """
        for find, reader in FILE_FORMATS:
            found = find(Path(name_or_path).expanduser())
            if found is not None:
                return reader(found, str(name_or_path))
        return cls(resolve_model_dir(name_or_path, revision), str(name_or_path))

    # -- what transformers needs to run the model ---------------------------------------
    def transformers_config(self) -> Any:
        """The model's ``transformers`` config (``AutoConfig``; never remote code)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.root), trust_remote_code=False)
        except Exception as exc:
            raise CheckpointError(f"{self.name}: cannot read the model config ({exc})") from None

    def load_tokenizer(self, **kwargs: Any) -> Any:
        """The tokenizer saved beside the weights (``AutoTokenizer``; ``kwargs`` passed on)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.root), trust_remote_code=False, **kwargs)
        except Exception as exc:
            raise CheckpointError(f"{self.name}: cannot load a tokenizer (save one beside the model): {exc}") from None

    def load_causal_lm(self, dtype: torch.dtype = torch.float32) -> Any:
        """The whole model as an ``AutoModelForCausalLM`` (evaluation, teachers and students; closed-form
        transfers never need it).

        Weights stored in another type (float32 read as bfloat16) are converted a block of rows at
        a time into a model built without weights, where the checkpoint's names are the model's;
        ``transformers`` loads the rest. Measured on Gemma-3-270M (float32 file, bfloat16 model):
        ``from_pretrained`` peaked 0.95 GB above the loaded model.
        """
        from transformers import AutoModelForCausalLM

        try:
            streamed = self._load_converted(dtype)
            if streamed is not None:
                return streamed
            return AutoModelForCausalLM.from_pretrained(str(self.root), dtype=dtype, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.root}: cannot load as a causal LM: {exc}") from None

    def _load_converted(self, dtype: torch.dtype) -> Any:
        """The model filled by :func:`~.meta.fill_by_blocks` when the stored type is not ``dtype`` and every stored
        name is a parameter of the model (else ``None``: ``transformers`` maps the names)."""
        from transformers import AutoModelForCausalLM

        from .meta import fill_by_blocks, parameters_on_meta

        keys = self.keys()
        if not keys or self._handle(self.file_of(keys[0])).dtype(keys[0]) == dtype:
            return None
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(self.transformers_config(), dtype=dtype)
        names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        if not set(keys) <= names:
            return None
        fill_by_blocks(model, keys, self.shape, lambda key, rows: self.get(key, rows), dtype)
        model.tie_weights()
        if any(p.device.type == "meta" for p in model.parameters()):
            return None  # a parameter the checkpoint does not hold: transformers knows why
        return model.eval()

    def side_files(self) -> dict[str, bytes]:
        """Config and tokenizer files a model directory needs beside its weights (name -> content)."""
        found: dict[str, bytes] = {}
        for path in sorted(self.root.iterdir()):
            if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in SIDE_FILES):
                found[path.name] = path.read_bytes()  # follows hub-cache symlinks
        return found

    # -- metadata -----------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        path = self.root / "config.json"
        if not self.root.is_dir() or not path.exists():
            return {}
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return config

    @property
    def model_type(self) -> str | None:
        """``config.json`` ``model_type`` (``None`` when absent)."""
        value = self.config.get("model_type")
        return str(value) if value is not None else None

    def _read_index(self) -> dict[str, Path]:
        root = self.root
        if root.is_file() and root.suffix == ".safetensors":  # a single-file checkpoint
            return dict.fromkeys(self._file_keys(root), root)
        for index_name in (SAFETENSORS_INDEX, DIFFUSERS_INDEX, BIN_INDEX):
            index = root / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{index}: not a valid shard index ({exc})") from exc
                missing = sorted({f for f in weight_map.values() if not (root / f).exists()})
                if missing:
                    raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
                return {key: root / fname for key, fname in weight_map.items()}
        files: list[Path]
        if (root / SAFETENSORS_SINGLE).exists():
            files = [root / SAFETENSORS_SINGLE]
        else:
            files = sorted(p for p in root.glob("*.safetensors") if p.name not in _ADAPTER_FILES)
        if not files and (root / BIN_SINGLE).exists():
            files = [root / BIN_SINGLE]
        if not files:
            raise CheckpointError(
                f"{root}: no model weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                f"{BIN_SINGLE}, {BIN_INDEX} or one .gguf file)"
            )
        weight_map: dict[str, Path] = {}
        for path in files:
            for key in self._file_keys(path):
                weight_map[key] = path
        return weight_map

    def _file_keys(self, path: Path) -> list[str]:
        return self._handle(path).keys()

    def _handle(self, path: Path) -> SafetensorsFile | BinFile:
        handle = self._handles.get(path)
        if handle is None:
            if path.suffix == ".safetensors":
                handle = SafetensorsFile(path, self._stack)
            else:
                handle = BinFile(path)
            self._handles[path] = handle
        return handle

    def keys(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self._weight_map

    def file_of(self, key: str) -> Path:
        """The file that stores ``key``."""
        try:
            return self._weight_map[key]
        except KeyError:
            raise CheckpointError(f"{self.name}: no tensor named {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the file header (no data is loaded)."""
        return tuple(self._handle(self.file_of(key)).shape(key))

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Load one tensor in its stored dtype, on CPU (only rows ``[start, stop)`` if given)."""
        path = self.file_of(key)
        try:
            handle = self._handle(path)
            if isinstance(handle, SafetensorsFile):
                return handle.get_tensor(key, rows)
            tensor = handle.get_tensor(key)
            return tensor if rows is None else tensor[rows[0] : rows[1]]
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({exc})") from exc

    def get_rows(self, key: str, rows: torch.Tensor, block: int = 4096) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique indices) of a matrix, read in spans of at most ``block`` rows.

        For a few thousand rows of a large vocabulary table: only the spans that hold them
        are read, never the whole table.
        """
        picked = []
        indices = rows.tolist()
        start = 0
        while start < len(indices):
            first = indices[start]
            stop = start
            while stop < len(indices) and indices[stop] < first + block:
                stop += 1
            span = self.get(key, rows=(first, indices[stop - 1] + 1))
            picked.append(span[torch.tensor(indices[start:stop]) - first])
            start = stop
        return torch.cat(picked) if picked else self.get(key, rows=(0, 0))

    def fingerprint(self, key: str) -> str:
        """A string that changes whenever the bytes of ``key`` may have changed.

        Built from the resolved file path (a content hash for hub-cache blobs), its size and
        modification time, and the tensor name: cheap, with no need to hash gigabytes.
        """
        found = self._fingerprints.get(key)
        if found is None:
            path = self.file_of(key).resolve()
            stat = path.stat()
            found = self._fingerprints[key] = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{key}"
        return found

    def resolve_module(self, module: str) -> str | None:
        """Tensor name of a module's weight, tolerating prefix differences.

        PEFT names modules as the model class does (``transformer.h.0.attn.c_attn``), while
        a checkpoint may have been saved without or with an extra prefix (``h.0.attn.c_attn``).
        Returns ``None`` when no weight matches.
        """
        if module in self._key_cache:
            return self._key_cache[module]
        found: str | None = None
        candidate = f"{module}.weight"
        if candidate in self._weight_map:
            found = candidate
        else:
            parts = module.split(".")
            for start in range(1, len(parts)):
                candidate = ".".join(parts[start:]) + ".weight"
                if candidate in self._weight_map:
                    found = candidate
                    break
            if found is None:
                suffix = f".{module}.weight"
                matches = [k for k in self._weight_map if k.endswith(suffix)]
                if len(matches) == 1:
                    found = matches[0]
        self._key_cache[module] = found
        return found

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Tensor names starting with ``prefix``, in index order."""
        return (k for k in self._weight_map if k.startswith(prefix))

    def close(self) -> None:
        """Release open file handles."""
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, model_type={self.model_type!r}, tensors={len(self._weight_map)})"
