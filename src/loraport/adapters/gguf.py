"""GGUF LoRA adapters (llama.cpp's ``--lora`` files, Ollama's ``ADAPTER``): reader and writer.

The layout, as llama.cpp's ``convert_lora_to_gguf.py`` writes it and ``src/llama-adapter.cpp``
checks it on load:

- metadata: ``general.architecture`` (must equal the base's), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32): **one** alpha for the file.
  llama.cpp scales each module by ``alpha / r``, ``r`` being that module's rank (``alpha = 0``
  means scale 1); a module whose scale differs from ``alpha / r`` (rsLoRA, its own
  ``alpha_pattern`` entry) gets the difference folded into its factors here.
- tensors: for each adapted base tensor ``<name>`` (``blk.0.attn_q.weight``), ``<name>.lora_a``
  and ``<name>.lora_b``, in numpy order ``(r, in)`` and ``(out, r)``: PEFT's ``A`` and ``B``
  (GGUF writes dimensions reversed, ``ne = [in, r]`` and ``[r, out]``; llama.cpp checks
  ``base.ne[0] == a.ne[0]``, ``base.ne[1] == b.ne[1]``, ``a.ne[1] == b.ne[0]``).
- rows of ``B`` in the base tensor's stored order: llama.cpp stores llama's ``attn_q`` /
  ``attn_k`` with each head's rotary halves interleaved, and its converter permutes ``B``'s
  rows the same way (``A`` is untouched). Which rows move is asked of the GGUF base reader
  (:func:`~loraport.checkpoints.gguf.stored_row_order`: the reordering it undoes when it reads
  the base), so the two can never disagree.

Ours on top (llama.cpp ignores them): the target base's scalar ``<arch>.*`` hyper-parameters
(layer and head counts), so the file can be read back without its base, and ``loraport.*``
provenance keys.

Example::

    >>> write_gguf_lora(adapter, "smollm2-facts.gguf", GGUFCheckpoint(Path("smollm2.gguf")))  # doctest: +SKIP
    >>> read_gguf_lora("smollm2-facts.gguf").modules["model.layers.0.self_attn.q_proj"].B.shape  # doctest: +SKIP
    torch.Size([576, 4])
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import Checkpoint, GGUFCheckpoint
from ..checkpoints.gguf import (
    GGUF_MAGIC,
    GGUFHeader,
    gguf_to_hf_names,
    read_header,
    read_tensor,
    stored_row_order,
    tensor_processor,
    transformers_config_dict,
)
from ..errors import AdapterError, CheckpointError
from .model import LoraAdapter, LoraModule

GGUF_LORA_NAME = "adapter.gguf"  # the file of a GGUF LoRA written into a directory
TYPE_KEY, ADAPTER_TYPE_KEY, ALPHA_KEY = "general.type", "adapter.type", "adapter.lora.alpha"
_SUFFIXES = (".lora_a", ".lora_b")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_STORAGE = {"F16": torch.float16, "BF16": torch.bfloat16}


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def gguf_lora_file(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF LoRA that ``path`` names: a ``.gguf`` file, or a directory without a PEFT config holding one.

    A file named ``.gguf`` counts even without the GGUF magic (empty, cut short): reading it says what is wrong.
    """
    path = Path(path)
    if is_gguf_file(path) or (path.suffix == ".gguf" and path.is_file()):
        return path
    if path.is_dir() and not (path / "adapter_config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def is_gguf_lora(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a GGUF file (or a directory holding one) whose ``general.type`` is ``adapter``.

    Raises:
        AdapterError: a GGUF file whose header cannot be read (truncated, corrupt): it is neither
            an adapter nor a model, and calling it a model would send the user the wrong way.
    """
    found = gguf_lora_file(path)
    if found is None:
        return False
    try:
        return read_header(found).metadata.get(TYPE_KEY) == "adapter"
    except CheckpointError as exc:
        raise AdapterError(str(exc)) from None


# -- writing ---------------------------------------------------------------------------------


def _file_alpha(modules: dict[str, LoraModule]) -> float:
    """The file's one alpha: the most common ``scale * r`` (float32, as stored), so most modules keep their factors."""
    alphas = Counter(float(np.float32(m.scale * m.rank)) for m in modules.values())
    return alphas.most_common(1)[0][0]


def _stored_factors(module: LoraModule, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` such that ``alpha / r * B @ A`` is the module's update (any other scale folded in, half each)."""
    ratio = module.scale / (alpha / module.rank)
    if ratio == 1.0:
        return module.A, module.B
    root = ratio**0.5
    return module.A.double() * root, module.B.double() * root


def _hyperparameters(header: GGUFHeader) -> list[tuple[str, Any, int]]:
    """The base's scalar ``<arch>.*`` keys with their GGUF value types."""
    import gguf

    prefix = str(header.metadata["general.architecture"]) + "."
    return [
        (key, value, header.value_types[key])
        for key, value in header.metadata.items()
        if key.startswith(prefix) and header.value_types.get(key) not in (None, gguf.GGUFValueType.ARRAY)
    ]


def write_gguf_lora(
    adapter: LoraAdapter,
    path: str | os.PathLike[str],
    base: GGUFCheckpoint,
    name: str | None = None,
    provenance: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter`` as a GGUF LoRA for the GGUF ``base`` (the file llama.cpp's ``--lora`` loads).

    Writes ``path`` directly (callers wanting atomicity write a temporary file and rename:
    :func:`loraport.io.atomic_file`). Factors are stored F32 (F16 for a float16 adapter).

    Args:
        adapter: modules named as ``transformers`` names the base's parameters
            (``model.layers.0.self_attn.q_proj``), factors ``A: (r, in)``, ``B: (out, r)``.
        base: the GGUF model the adapter is for: its architecture, tensor names and row order.
        name: ``general.name`` (default: the base's name + `` LoRA``).
        provenance: extra string keys, written as ``loraport.<key>``.

    Raises:
        AdapterError: a module with no tensor in the base, a shape that does not fit it, a conv
            module, or an architecture whose stored rows loraport cannot reorder.
    """
    import gguf

    path = Path(path)
    if not adapter.modules:
        raise AdapterError(f"{path}: an adapter without modules cannot be written")
    architecture = base.architecture
    processor = base.processor
    alpha = _file_alpha(adapter.modules)
    storage = np.float16 if adapter.dtype == torch.float16 else np.float32
    tensors: list[tuple[str, np.ndarray]] = []
    for module in adapter.modules.values():
        key = base.resolve_module(module.name)
        gguf_name = base.gguf_names.get(key) if key is not None else None
        if gguf_name is None:
            raise AdapterError(f"{path}: module {module.name} has no tensor in the GGUF base {base.file}")
        if module.kernel is not None:
            raise AdapterError(f"{path}: module {module.name} is a conv LoRA; GGUF LoRAs hold linear modules only")
        shape = base.header.tensors[gguf_name].shape  # (out, in): llama.cpp's layout, also for GPT-2
        if len(shape) != 2 or (module.B.shape[0], module.A.shape[1]) != shape:
            raise AdapterError(
                f"{path}: module {module.name} updates a {module.shape[0]}x{module.shape[1]} matrix but "
                f"{gguf_name} of {base.file} is {'x'.join(map(str, shape))}"
            )
        try:
            order = stored_row_order(processor, gguf_name, shape[0])
        except ValueError as exc:
            raise AdapterError(f"{path}: GGUF LoRA for {architecture} is not supported: {exc}") from None
        A, B = _stored_factors(module, alpha)
        if order is not None:  # the reader takes stored[order]: store B's rows where it will find them
            B = B[torch.from_numpy(np.argsort(order))]
        tensors.append((gguf_name + ".lora_a", A.detach().to("cpu", torch.float64).numpy().astype(storage)))
        tensors.append((gguf_name + ".lora_b", B.detach().to("cpu", torch.float64).numpy().astype(storage)))

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    base_name = base.header.metadata.get("general.name")
    writer.add_name(name or (f"{base_name} LoRA" if isinstance(base_name, str) else "LoRA"))
    for key, value, vtype in _hyperparameters(base.header):
        writer.add_key_value(key, value, gguf.GGUFValueType(vtype))
    for key, value in (provenance or {}).items():
        writer.add_string(f"loraport.{key}", str(value))
    for tensor_name, values in tensors:
        writer.add_tensor(tensor_name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- reading ---------------------------------------------------------------------------------


def _check_metadata(path: Path, header: GGUFHeader) -> tuple[str, float]:
    """``(architecture, alpha)`` of a GGUF LoRA, or an error naming the key that is wrong or missing."""
    meta = header.metadata
    kind = meta.get(TYPE_KEY)
    if kind != "adapter":
        # A model has tensors and no LoRA factors; a file without tensors is no model either.
        factors = any(name.endswith(_SUFFIXES) for name in header.tensors)
        model = kind == "model" or (bool(header.tensors) and not factors)
        hint = " (a model file: pass it as a base, not as --adapter)" if model else ""
        if not header.tensors and not meta:
            hint = " (the file holds no metadata and no tensors: not a readable GGUF LoRA)"
        raise AdapterError(f"{path}: general.type is {kind!r}, expected 'adapter'{hint}")
    if meta.get(ADAPTER_TYPE_KEY) != "lora":
        raise AdapterError(f"{path}: adapter.type is {meta.get(ADAPTER_TYPE_KEY)!r}, expected 'lora'")
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str):
        raise AdapterError(f"{path}: no general.architecture")
    alpha = meta.get(ALPHA_KEY)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise AdapterError(f"{path}: no {ALPHA_KEY} (llama.cpp's LoRA scale is alpha / r)")
    if not np.isfinite(alpha) or alpha < 0:
        raise AdapterError(f"{path}: {ALPHA_KEY} must be a finite number >= 0, got {alpha}")
    return architecture, float(alpha)


def _config_and_names(
    path: Path, header: GGUFHeader, architecture: str, base: Checkpoint | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config the rows are reordered with and the GGUF -> ``transformers`` name map (from the base if given)."""
    if isinstance(base, GGUFCheckpoint):
        if base.architecture != architecture:
            raise AdapterError(f"{path}: a LoRA for {architecture}, but the base {base.file} is {base.architecture}")
        return base.config, {gguf_name: hf for hf, gguf_name in base.gguf_names.items()}
    if base is not None:
        config = base.config
    else:
        try:
            config = transformers_config_dict(header)
        except CheckpointError as exc:
            raise AdapterError(f"{path}: {exc}") from None
        if f"{architecture}.block_count" not in header.metadata:  # llama.cpp's converter does not write it
            blocks = [int(m.group(1)) for n in header.tensors if (m := _BLOCK.match(n))]
            config["num_hidden_layers"] = max(blocks, default=-1) + 1
        config["pad_token_id"] = None  # no tokenizer here: a default pad id may not fit the file's vocabulary
    try:
        return config, gguf_to_hf_names(architecture, config, tensor_processor(architecture, config))
    except Exception as exc:  # building the model class from a partial config: any failure is this one message
        raise AdapterError(f"{path}: cannot map {architecture} tensor names ({type(exc).__name__}: {exc})") from None


def _why_unsupported(name: str) -> str:
    if name.startswith("token_embd."):
        return "LoRA on an embedding"
    if name.endswith("_norm.weight"):
        return "norm weights (llama.cpp ignores them too)"
    return "not a .lora_a / .lora_b tensor"


def read_gguf_lora(
    path: str | os.PathLike[str], drop_unsupported: bool = False, base: Checkpoint | None = None
) -> LoraAdapter:
    """Read a GGUF LoRA into :class:`LoraAdapter` (``transformers`` names, PEFT layout and row order).

    Args:
        path: the ``.gguf`` file.
        drop_unsupported: skip parts we cannot port (LoRA on ``token_embd``, norm vectors)
            instead of raising; they are listed in :attr:`LoraAdapter.dropped`.
        base: the base model (GGUF or not) the adapter is for: its names, and for llama its
            head counts, which llama.cpp's converter does not write into the adapter (ours does).

    Raises:
        AdapterError: not a GGUF LoRA (wrong ``general.type`` / ``adapter.type``, no alpha),
            a corrupt or truncated file, unpaired or mis-shaped factors, NaN / Inf values,
            tensors that map to no module of the architecture.
    """
    path = Path(path)
    try:
        header = read_header(path)
    except CheckpointError as exc:
        raise AdapterError(str(exc)) from None
    architecture, alpha = _check_metadata(path, header)
    pairs: dict[str, dict[str, Any]] = {}
    dropped: dict[str, str] = {}
    for name, info in header.tensors.items():
        suffix = name[-7:]
        if suffix in _SUFFIXES and not name.startswith("token_embd."):
            pairs.setdefault(name[:-7], {})[suffix] = info
        else:
            dropped[name] = _why_unsupported(name)
    if dropped and not drop_unsupported:
        first = next(iter(dropped))
        raise AdapterError(
            f"{path}: {len(dropped)} tensor(s) are not LoRA factors of linear layers (first: {first}, "
            f"{dropped[first]}); pass drop_unsupported=True (--drop-unsupported) to port the rest"
        )
    if not pairs:
        raise AdapterError(f"{path}: no LoRA factors found (expected <tensor>.lora_a and <tensor>.lora_b)")
    config, to_hf = _config_and_names(path, header, architecture, base)
    processor = tensor_processor(architecture, config)
    heads_known = base is not None or f"{architecture}.attention.head_count" in header.metadata
    probe = tensor_processor(architecture, {**config, "num_attention_heads": 1, "num_key_value_heads": 1})
    modules: dict[str, LoraModule] = {}
    storage: Counter[torch.dtype] = Counter()
    with open(path, "rb") as handle:
        for gguf_name, pair in pairs.items():
            if set(pair) != set(_SUFFIXES):
                missing = next(s for s in _SUFFIXES if s not in pair)
                raise AdapterError(f"{path}: {gguf_name} has no {gguf_name}{missing}")
            hf_name = to_hf.get(gguf_name)
            if hf_name is None or not hf_name.endswith(".weight"):
                raise AdapterError(f"{path}: {gguf_name} is not a weight of a {config.get('model_type')} model")
            A, B = (read_tensor(handle.fileno(), pair[s], path) for s in _SUFFIXES)
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise AdapterError(
                    f"{path}: {gguf_name}: lora_a {A.shape} and lora_b {B.shape} do not form a rank-r product "
                    "(expected lora_a (r, in) and lora_b (out, r), numpy order)"
                )
            if not (np.isfinite(A).all() and np.isfinite(B).all()):
                raise AdapterError(f"{path}: {gguf_name}: LoRA factors contain NaN or Inf")
            try:
                if not heads_known and stored_row_order(probe, gguf_name, B.shape[0]) is not None:
                    raise AdapterError(
                        f"{path}: the rows of {gguf_name}.lora_b are in llama.cpp's per-head order and the file does "
                        "not give the head counts; pass the base model it is for (--source-base, --base, --model)"
                    )
                order = stored_row_order(processor, gguf_name, B.shape[0])
            except ValueError as exc:
                raise AdapterError(f"{path}: GGUF LoRA for {architecture} is not supported: {exc}") from None
            if order is not None:
                B = B[order]
            dtype = _STORAGE.get(_type_name(pair[".lora_a"].ggml_type), torch.float32)
            storage[dtype] += 1
            rank = int(A.shape[0])
            module_name = hf_name.removesuffix(".weight")
            module_alpha = alpha if alpha > 0 else float(rank)  # llama.cpp: alpha 0 means scale 1
            modules[module_name] = LoraModule(
                module_name,
                torch.from_numpy(np.ascontiguousarray(A)).to(dtype),
                torch.from_numpy(np.ascontiguousarray(B)).to(dtype),
                module_alpha,
            )
    config = _peft_config(modules, header, base)
    return LoraAdapter(modules, config, dtype=storage.most_common(1)[0][0], path=path, dropped=dropped)


def _type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return str(ggml_type)


def _peft_config(modules: dict[str, LoraModule], header: GGUFHeader, base: Checkpoint | None) -> dict[str, Any]:
    """A PEFT config for the modules read (ranks and alphas from them), naming the base when known."""
    from .peft import adapter_config_for

    name = base.name if base is not None else header.metadata.get("loraport.target_base")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    adapter = LoraAdapter(modules=modules, config={"peft_type": "LORA", "task_type": "CAUSAL_LM"})
    return adapter_config_for(adapter, name if isinstance(name, str) else None, leaves)


__all__ = ["GGUF_LORA_NAME", "gguf_lora_file", "is_gguf_file", "is_gguf_lora", "read_gguf_lora", "write_gguf_lora"]
