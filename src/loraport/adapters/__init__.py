"""LoRA adapters: the in-memory model (:mod:`.model`) and the formats it is read from and written to.

- :mod:`.peft`: PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``);
- :mod:`.gguf`: GGUF LoRA files (llama.cpp's ``--lora``, Ollama's ``ADAPTER``).

:func:`load_adapter` reads any of them.

Example::

    >>> adapter = load_adapter("runs/qwen-lora")                # doctest: +SKIP
    >>> m = adapter.modules["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    >>> (m.B.shape, m.A.shape, m.scale)                          # doctest: +SKIP
    (torch.Size([1536, 16]), torch.Size([16, 1536]), 2.0)
"""

from __future__ import annotations

import os

from ..checkpoints import Checkpoint, GGUFCheckpoint
from ..errors import LoraportError
from .gguf import GGUF_LORA_NAME, gguf_lora_file, is_gguf_file, is_gguf_lora, read_gguf_lora, write_gguf_lora
from .model import LoraAdapter, LoraModule, lora_scale
from .peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    WEIGHTS_NAME_BIN,
    adapter_config_for,
    attach_adapter,
    pattern_value,
    read_peft_adapter,
    save_adapter,
)


def load_adapter(
    path: str | os.PathLike[str], drop_unsupported: bool = False, base: Checkpoint | None = None
) -> LoraAdapter:
    """Read a LoRA adapter: a PEFT directory, or a GGUF LoRA (a ``.gguf`` file, or a directory holding one).

    Args:
        path: a PEFT adapter directory or a GGUF LoRA.
        drop_unsupported: skip parts we cannot port (``modules_to_save`` copies, LoRA on
            embeddings, norm vectors) instead of raising; they are listed in :attr:`LoraAdapter.dropped`.
        base: the base model the adapter is for; a GGUF LoRA takes its tensor names and (llama)
            head counts from it when the file does not carry them (llama.cpp's converter writes
            none). Ignored for PEFT directories.

    Raises:
        AdapterError: missing or malformed files, unsupported adapter types, inconsistent ranks,
            non-finite values (the message names the file).
    """
    gguf_file = gguf_lora_file(path)
    if gguf_file is not None:
        return read_gguf_lora(gguf_file, drop_unsupported, base)
    return read_peft_adapter(path, drop_unsupported)


def output_format(
    requested: str | None, adapter: str | os.PathLike[str] | LoraAdapter, out: str | os.PathLike[str] | None
) -> str:
    """``peft`` or ``gguf``, the format a language-model LoRA is written in: ``requested`` if given, else ``gguf``
    for an ``out`` ending in ``.gguf``, else the input's format.

    Raises:
        LoraportError: an image-model format, or a ``.gguf`` ``out`` with ``requested="peft"``.
    """
    if requested not in (None, "peft", "gguf"):
        raise LoraportError(f"--out-format {requested} is for image-model LoRAs; LLM adapters are peft or gguf")
    if out is not None and str(out).endswith(".gguf"):
        if requested == "peft":
            raise LoraportError(f"{out}: a PEFT adapter is a directory; pass another --out, or --out-format gguf")
        return "gguf"
    if requested is not None:
        return requested
    from_gguf = not isinstance(adapter, LoraAdapter) and gguf_lora_file(adapter) is not None
    return "gguf" if from_gguf else "peft"


def gguf_target(base: Checkpoint | None) -> GGUFCheckpoint:
    """``base`` if it is a GGUF model, else an error: a GGUF LoRA takes its names, architecture, row order from it."""
    if not isinstance(base, GGUFCheckpoint):
        named = f"{base.name}: " if base is not None else ""
        raise LoraportError(
            f"{named}a GGUF LoRA needs the .gguf base it is for (its tensor names, architecture and row order); "
            "pass that GGUF file, or --out-format peft"
        )
    return base


__all__ = [
    "CONFIG_NAME",
    "GGUF_LORA_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_NAME_BIN",
    "LoraAdapter",
    "LoraModule",
    "adapter_config_for",
    "attach_adapter",
    "gguf_lora_file",
    "gguf_target",
    "is_gguf_file",
    "is_gguf_lora",
    "load_adapter",
    "lora_scale",
    "output_format",
    "pattern_value",
    "read_gguf_lora",
    "read_peft_adapter",
    "save_adapter",
    "write_gguf_lora",
]
