"""GGUF files (llama.cpp's format) as base models: one tensor at a time, dequantized to float32.

:class:`GGUFCheckpoint` has the interface of :class:`~loraport.checkpoints.Checkpoint`:
``config`` (the ``transformers`` config built from the GGUF metadata), ``keys`` / ``shape`` /
``get`` under the Hugging Face tensor names the role maps use, ``fingerprint`` for the
subspace cache, plus the tokenizer and the whole model for the calibrated method and the
evaluator.

What comes from libraries, and what is ours:

- dequantization: :func:`gguf.quants.dequantize` (every type ``gguf`` implements; others
  are an error naming the tensor and its type);
- names: ``transformers``' GGUF name map (:func:`get_gguf_hf_weights_map`, built on
  ``gguf``'s tensor-name tables) applied to the model class built from the config on the
  ``meta`` device;
- tensor fixes: ``transformers``' tensor processors (the llama q/k row permutation undone
  for ``general.architecture == llama``, mistral files included; gemma's norm weights stored
  as ``1 + w`` shifted back), exactly as ``from_pretrained(..., gguf_file=...)`` applies them;
- config: ``transformers``' GGUF key map (``GGUF_CONFIG_MAPPING``) with the special cases
  of its loader (checked equal to ``AutoConfig.from_pretrained(..., gguf_file=...)`` in the
  tests);
- tokenizer: ``transformers``' GGUF tokenizer conversion, run once per file and cached.

Ours: the header scan. ``gguf.GGUFReader`` builds Python objects for every element of every
metadata array: opening Gemma-3-270M (a 262,144-token vocabulary, tokens, scores and types)
took 22-39 s and 1.6 GB RSS here, against well under a second for :func:`read_header`, which
skips arrays it does not need. Tensor data is read with positioned reads into a fresh
buffer (no memory map), so peak memory stays at about one tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from .base import BIN_INDEX, BIN_SINGLE, FILE_FORMATS, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, Checkpoint
from .files import read_bytes

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Metadata arrays longer than this (tokenizer vocabularies, scores, merges) are skipped, not parsed.
_MAX_ARRAY = 4096
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
# transformers' processors that keep tensor shapes (everything we map for the role files).
_SHAPE_KEEPING = {"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its GGUF name, numpy-order shape, ggml type and absolute byte range."""

    name: str
    shape: tuple[int, ...]  # numpy / torch order (GGUF stores the reverse)
    ggml_type: int
    offset: int
    nbytes: int


@dataclass
class GGUFHeader:
    """Metadata (arrays longer than ``_MAX_ARRAY`` are recorded by length only) and tensor table.

    ``value_types``: the GGUF value type of each metadata key (``gguf.GGUFValueType``).
    """

    version: int
    metadata: dict[str, Any]
    skipped_arrays: dict[str, int]
    tensors: dict[str, TensorInfo]
    value_types: dict[str, int] = field(default_factory=dict)


class _Cursor:
    """Sequential little-endian reads over a file, in 1 MiB windows."""

    def __init__(self, handle: Any, size: int) -> None:
        self.handle, self.size = handle, size
        self.buffer, self.start, self.pos = b"", 0, 0

    def _ensure(self, n: int) -> None:
        if self.pos + n > self.start + len(self.buffer):
            if self.pos + n > self.size:
                raise ValueError(f"unexpected end of file at byte {self.pos} (file has {self.size})")
            self.handle.seek(self.pos)
            self.buffer, self.start = self.handle.read(max(n, 1 << 20)), self.pos

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self._ensure(n)
        value = struct.unpack_from(fmt, self.buffer, self.pos - self.start)[0]
        self.pos += n
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if length > self.size:
            raise ValueError(f"string length {length} at byte {self.pos} exceeds the file")
        self._ensure(length)
        raw = self.buffer[self.pos - self.start : self.pos - self.start + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.take("<Q")  # not `self.pos += self.take(...)`: that adds to the old position
        self.pos += length

    def value(self, vtype: int, key: str, skipped: dict[str, int]) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"metadata {key!r} has unknown value type {vtype}")
        item_type, count = self.take("<I"), self.take("<Q")
        if count <= _MAX_ARRAY:
            return [self.value(item_type, key, skipped) for _ in range(count)]
        skipped[key] = count
        if item_type in _SCALAR_FORMATS:
            self.pos += count * struct.calcsize(_SCALAR_FORMATS[item_type])
        elif item_type == _STRING:
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.value(item_type, key, skipped)
        return None


def read_header(path: Path) -> GGUFHeader:
    """Parse the header and tensor table of a GGUF file (v2 or v3), checking every tensor fits the file.

    Raises:
        CheckpointError: not a GGUF file, an unsupported version, or a truncated / corrupt file.
    """
    from gguf.quants import quant_shape_to_byte_shape

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 and GGUF_MAGIC.startswith(magic):  # an empty file, or one cut inside the magic
                raise ValueError(f"{size} bytes, shorter than the GGUF magic")
            if magic != GGUF_MAGIC:
                raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
            cursor = _Cursor(handle, size)
            cursor.pos = 4
            version = cursor.take("<I")
            if version not in (2, 3):
                raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = cursor.take("<Q"), cursor.take("<Q")
            metadata: dict[str, Any] = {}
            skipped: dict[str, int] = {}
            value_types: dict[str, int] = {}
            for _ in range(n_kv):
                key = cursor.string()
                if not key or key in value_types:  # llama.cpp refuses these too (gguf.cpp)
                    raise ValueError(f"{'duplicate' if key else 'empty'} metadata key {key!r} at byte {cursor.pos}")
                value_types[key] = cursor.take("<I")
                metadata[key] = cursor.value(value_types[key], key, skipped)
            raw: list[tuple[str, tuple[int, ...], int, int]] = []
            names: set[str] = set()
            for _ in range(n_tensors):
                name = cursor.string()
                n_dims = cursor.take("<I")
                if not name or name in names or n_dims > _MAX_DIMS:  # llama.cpp refuses these too (gguf.cpp)
                    raise ValueError(f"tensor {name!r} at byte {cursor.pos}: empty or duplicate name, or {n_dims} dims")
                names.add(name)
                dims = [cursor.take("<Q") for _ in range(n_dims)]
                raw.append((name, tuple(reversed(dims)), cursor.take("<I"), cursor.take("<Q")))
            alignment = metadata.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise ValueError(f"general.alignment is {alignment!r}, not a power of two")
            misaligned = next((name for name, _, _, offset in raw if offset % alignment), None)
            if misaligned is not None:
                raise ValueError(f"tensor {misaligned!r} starts off the {alignment}-byte alignment")
            data_start = -(-cursor.pos // alignment) * alignment
    except CheckpointError:
        raise
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({exc})") from None
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, relative in raw:
        try:
            import gguf

            byte_shape = quant_shape_to_byte_shape(shape or (1,), gguf.GGMLQuantizationType(ggml_type))  # () a scalar
            nbytes = int(np.prod(byte_shape))
        except (ValueError, KeyError):
            nbytes = -1  # a type gguf does not know: an error only if the tensor is read
        begin = data_start + relative
        if nbytes > 0 and begin + nbytes > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated GGUF file (tensor {name!r} spans bytes {begin}-{begin + nbytes} "
                f"of a {size}-byte file)"
            )
        tensors[name] = TensorInfo(name, shape, ggml_type, begin, nbytes)
    return GGUFHeader(version, metadata, skipped, tensors, value_types)


def find_gguf(path: Path) -> Path | None:
    """The GGUF file that ``path`` names: the file itself, or the only ``.gguf`` of a directory without other weights.

    Returns ``None`` for directories with safetensors / ``.bin`` weights or no GGUF file (and
    for paths that do not exist: hub ids are resolved elsewhere).

    Raises:
        CheckpointError: a file that is not GGUF, or a directory with several GGUF files.
    """
    if path.is_file():
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"{path}: not a GGUF file and not a model directory (expected a .gguf file or a directory with "
                f"config.json and safetensors weights)"
            )
        return path
    if not path.is_dir():
        return None
    regular = (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE)
    if any((path / name).exists() for name in regular) or any(
        p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_model")
    ):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{path}: holds several GGUF files ({names}); pass the one to use")
    return found[0] if found else None


# -- config ----------------------------------------------------------------------------------


def transformers_config_dict(header: GGUFHeader) -> dict[str, Any]:
    """The ``transformers`` config of a GGUF model, from its metadata, as ``from_pretrained(gguf_file=)`` builds it."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    meta = header.metadata
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str):
        raise CheckpointError("GGUF metadata has no general.architecture")
    name = meta.get("general.name")
    model_type = architecture
    # transformers' loader: llama.cpp files mistral models as llama; gemma3 files hold the text model.
    if "llama" in architecture and isinstance(name, str) and "mistral" in name.lower():
        model_type = "mistral"
    if architecture in ("qwen2moe", "qwen3moe"):
        model_type = architecture.replace("moe", "_moe")
    if model_type not in GGUF_CONFIG_MAPPING:
        supported = ", ".join(sorted(GGUF_CONFIG_MAPPING))
        raise CheckpointError(f"GGUF architecture {architecture!r} is not supported by transformers ({supported})")
    values: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
    values["tie_word_embeddings"] = "output.weight" not in header.tensors
    renames = GGUF_CONFIG_MAPPING[model_type]
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        if prefix == architecture and rest in renames and renames[rest] not in (None, -1):
            values[renames[rest]] = value
    if "vocab_size" not in values:
        count = header.skipped_arrays.get("tokenizer.ggml.tokens")
        tokens = meta.get("tokenizer.ggml.tokens")
        if count is None and isinstance(tokens, list):
            count = len(tokens)
        if count is not None:
            values["vocab_size"] = count
        elif "token_embd.weight" in header.tensors:
            values["vocab_size"] = header.tensors["token_embd.weight"].shape[0]
    for special in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{special}_token_id")
        if isinstance(token_id, int):
            prefix_name = {"unknown": "unk", "padding": "pad"}.get(special, special)
            values[f"{prefix_name}_token_id"] = token_id
    if model_type == "gemma3":
        model_type = "gemma3_text"
    if isinstance(name, str):
        values["_model_name_or_path"] = name
    try:
        config = AutoConfig.for_model(model_type, **values)
    except Exception as exc:
        raise CheckpointError(f"cannot build a {model_type} config from the GGUF metadata ({exc})") from None
    return config.to_dict()


# -- what the reader does to names and tensors (shared with the GGUF LoRA reader and writer) --


def transformers_config(config: dict[str, Any]) -> Any:
    """The ``transformers`` config object of a config dict (``model_type`` picks the class)."""
    from transformers import AutoConfig

    values = dict(config)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def tensor_processor(architecture: str, config: dict[str, Any]) -> Any:
    """``transformers``' tensor processor for a GGUF architecture (the llama q/k permutation, gemma norms, ...)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)


def gguf_to_hf_names(architecture: str, config: dict[str, Any], processor: Any) -> dict[str, str]:
    """GGUF tensor name -> ``transformers`` parameter name, from ``gguf``'s tensor-name table.

    The mapping rule of ``transformers``' ``get_gguf_hf_weights_map`` (each parameter's
    name without ``.weight`` / ``.bias`` looked up in the table; a name not found is tried
    again without its leading components, which is what its recursion over submodules
    does), with the table built once: that function rebuilds it for every submodule, 794
    times for SmolLM2 (26 s here). The parameter names are those of the model class of
    ``config``, built on the ``meta`` device.

    Raises:
        CheckpointError: ``gguf`` has no tensor-name table for ``architecture``.
    """
    import gguf
    from transformers import AutoModelForCausalLM

    arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        raise CheckpointError(f"the gguf package has no tensor-name table for architecture {architecture!r}")
    table = gguf.get_tensor_name_map(arch, int(config.get("num_hidden_layers") or 0))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(transformers_config(config), trust_remote_code=False)
    mapping: dict[str, str] = {}
    for hf_name in model.state_dict():
        name = processor.preprocess_name(hf_name)
        stem, suffix = name, ""
        if name.endswith((".weight", ".bias")):
            stem, _, last = name.rpartition(".")
            suffix = "." + last
        parts = stem.split(".")
        for start in range(len(parts)):
            gguf_stem = table.get_name(".".join(parts[start:]))
            if gguf_stem is not None:
                mapping.setdefault(gguf_stem + suffix, hf_name)
                break
    return mapping


def stored_row_order(processor: Any, gguf_name: str, rows: int) -> np.ndarray | None:
    """How the reader reorders the rows of a stored matrix: ``p`` with ``read = stored[p]``, or ``None`` if it does not.

    Found by running ``processor`` (what :meth:`GGUFCheckpoint.get` applies) on a ``(rows, 2)``
    matrix of distinct numbers: for llama's ``attn_q`` / ``attn_k`` it is the inverse of
    llama.cpp's rotary-half permutation. A transpose (GPT-2 stores ``Conv1D`` weights
    transposed; readers of LoRA factors, which are in ``Linear`` layout, need no change) is
    also ``None``.

    Raises:
        ValueError: the processor does something to this tensor that is neither a row
            permutation nor a transpose (the message says what).
    """
    stored = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2)
    try:
        read = np.asarray(processor.process(weights=stored, name=gguf_name, parsed_parameters={"tensors": {}}).weights)
    except Exception as exc:
        what = type(processor).__name__
        raise ValueError(f"{what} cannot process {gguf_name} as a matrix of {rows} rows ({exc})") from None
    if read.shape == stored.shape[::-1] and np.array_equal(read, stored.T):
        return None
    order = (read[:, 0] // 2).astype(np.int64) if read.shape == stored.shape else None
    if order is None or not np.array_equal(read, stored[order]):
        raise ValueError(f"{type(processor).__name__} changes {gguf_name} in a way that is not a row permutation")
    return None if np.array_equal(order, np.arange(rows)) else order


def read_tensor(fd: int, info: TensorInfo, file: Path) -> np.ndarray:
    """One tensor as stored (numpy order), dequantized to float32.

    Raises:
        CheckpointError: an unknown or undequantizable ggml type, or a read error (naming the file and tensor).
    """
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    try:
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
    except ValueError:
        raise CheckpointError(f"{file}: tensor {info.name} has unknown ggml type {info.ggml_type}") from None
    try:
        data = read_bytes(fd, info.offset, info.nbytes).numpy()
        values = gguf.quants.dequantize(data.reshape(quant_shape_to_byte_shape(info.shape, qtype)), qtype)
    except NotImplementedError:
        raise CheckpointError(
            f"{file}: tensor {info.name} is stored as {qtype.name}, which the gguf package cannot dequantize"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read tensor {info.name} ({exc})") from None
    return np.asarray(values, dtype=np.float32).reshape(info.shape)


# -- the checkpoint --------------------------------------------------------------------------


class GGUFCheckpoint(Checkpoint):
    """A GGUF file read lazily, one tensor at a time, under the Hugging Face tensor names.

    Args:
        path: the ``.gguf`` file.
        name: what the user passed (used in messages and in written adapters).

    Attributes:
        file: the GGUF file; ``root`` is its directory.
        header: the parsed header (metadata and tensor table).
        gguf_names: Hugging Face tensor name -> GGUF tensor name.
        processor: ``transformers``' tensor processor that :meth:`get` applies (:func:`tensor_processor`).
    """

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.file = Path(path)
        self.header = read_header(self.file)
        self._config_obj: Any = None
        super().__init__(self.file.parent, name if name is not None else str(path))
        self.processor = tensor_processor(self.architecture, self.config)
        self._shapes: dict[str, tuple[int, ...]] = {}

    # -- metadata -----------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        return transformers_config_dict(self.header)

    def _read_index(self) -> dict[str, Path]:
        to_hf = self._gguf_to_hf_names()
        self.gguf_names: dict[str, str] = {}
        for gguf_name in self.header.tensors:
            hf_name = to_hf.get(gguf_name)
            if hf_name is not None:
                self.gguf_names[hf_name] = gguf_name
        if not self.gguf_names:
            raise CheckpointError(f"{self.file}: no tensor of the GGUF file maps to a {self.model_type} parameter")
        unmapped = [n for n in self.header.tensors if n not in to_hf]
        if unmapped:
            log.info("%s: %d GGUF tensor(s) not used by transformers: %s", self.file, len(unmapped), unmapped[:5])
        return dict.fromkeys(self.gguf_names, self.file)

    def _gguf_to_hf_names(self) -> dict[str, str]:
        """GGUF tensor name -> ``transformers`` parameter name (:func:`gguf_to_hf_names`)."""
        try:
            return gguf_to_hf_names(self.architecture, self.config, tensor_processor(self.architecture, self.config))
        except CheckpointError as exc:
            raise CheckpointError(f"{self.file}: {exc}") from None

    def _file_keys(self, path: Path) -> list[str]:
        return list(self.gguf_names)

    @property
    def architecture(self) -> str:
        """``general.architecture`` of the file (``llama``, ``qwen2``, ``gemma3``, ...)."""
        return str(self.header.metadata["general.architecture"])

    def transformers_config(self) -> Any:
        if self._config_obj is None:
            self._config_obj = transformers_config(self.config)
        return self._config_obj

    # -- tensors ------------------------------------------------------------------------
    def _info(self, key: str) -> TensorInfo:
        gguf_name = self.gguf_names.get(key)
        if gguf_name is None:
            raise CheckpointError(f"{self.name}: no tensor named {key!r}")
        return self.header.tensors[gguf_name]

    def shape(self, key: str) -> tuple[int, ...]:
        info = self._info(key)
        if type(self.processor).__name__ in _SHAPE_KEEPING:
            return info.shape
        if key not in self._shapes:  # a processor that may transpose (gpt2): ask it
            self._shapes[key] = tuple(self.get(key).shape)
        return self._shapes[key]

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor dequantized to float32 and processed as ``transformers`` loads it (only rows ``[start, stop)``
        if given)."""
        info = self._info(key)
        weights = read_tensor(self._fd(), info, self.file)
        weights = self.processor.process(weights=weights, name=info.name, parsed_parameters={"tensors": {}}).weights
        tensor = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    def get_rows(self, key: str, rows: torch.Tensor, block: int = 4096) -> torch.Tensor:
        """Rows of a matrix: GGUF tensors are dequantized whole, so one read, then a selection."""
        return self.get(key).index_select(0, rows)

    def _fd(self) -> int:
        handle = self._handles.get(self.file)
        if handle is None:
            handle = self._stack.enter_context(open(self.file, "rb"))  # noqa: SIM115 - closed by the stack
            self._handles[self.file] = handle  # type: ignore[assignment]
        return handle.fileno()  # type: ignore[union-attr]

    # -- what transformers needs to run the model ---------------------------------------
    def _cache_dir(self) -> Path:
        from ..io import default_cache_dir

        stat = self.file.resolve().stat()
        digest = hashlib.sha256(f"{self.file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return default_cache_dir().parent / "gguf" / f"{self.file.stem}-{digest}"

    def _tokenizer_dir(self) -> Path:
        """A directory with the tokenizer converted from the GGUF metadata (built once, then cached)."""
        from transformers import AutoTokenizer

        cache = self._cache_dir()
        if (cache / "tokenizer_config.json").is_file():
            return cache
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.root), gguf_file=self.file.name)
        except Exception as exc:
            raise CheckpointError(f"{self.file}: cannot build the tokenizer from the GGUF metadata ({exc})") from None
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, cache)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
        return cache

    def load_tokenizer(self, **kwargs: Any) -> Any:
        """The tokenizer in the GGUF metadata, converted by ``transformers`` (once per file, then cached)."""
        from transformers import AutoTokenizer

        directory = self._tokenizer_dir()
        try:
            return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, **kwargs)
        except Exception as exc:
            raise CheckpointError(f"{directory}: cannot load the tokenizer cached from {self.file} ({exc})") from None

    def load_causal_lm(self, dtype: torch.dtype = torch.float32) -> Any:
        """The whole model: built from the config, weights assigned one tensor at a time (a tied head re-tied)."""
        from transformers import AutoModelForCausalLM

        from .meta import parameters_on_meta

        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(self.transformers_config(), dtype=dtype)
        state = {key: self.get(key).to(dtype) for key in self.keys()}
        model.load_state_dict(state, strict=False, assign=True)
        del state
        model.tie_weights()
        missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise CheckpointError(f"{self.file}: the GGUF file has no tensor for {', '.join(missing[:3])}")
        return model.eval()

    def side_files(self) -> dict[str, bytes]:
        """``config.json`` and the tokenizer files, so a model written from this base loads with ``transformers``."""
        files = {p.name: p.read_bytes() for p in self._tokenizer_dir().iterdir() if p.is_file()}
        files["config.json"] = (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode()
        return files

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({self.name!r}, model_type={self.model_type!r}, tensors={len(self.gguf_names)})"


FILE_FORMATS.append((find_gguf, GGUFCheckpoint))
