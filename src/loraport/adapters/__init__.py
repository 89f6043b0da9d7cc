"""LoRA adapters: the in-memory model (:mod:`.model`) and the formats it is read from and written to.

- :mod:`.peft`: PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``);

:func:`load_adapter` reads any of them.

Example::

    >>> adapter = load_adapter("runs/qwen-lora")                # doctest: +SKIP
    >>> m = adapter.modules["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    >>> (m.B.shape, m.A.shape, m.scale)                          # doctest: +SKIP
    (torch.Size([1536, 16]), torch.Size([16, 1536]), 2.0)
"""

from __future__ import annotations

import os

from .model import LoraAdapter, LoraModule, lora_scale
from .peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    WEIGHTS_NAME_BIN,
    adapter_config_for,
    pattern_value,
    read_peft_adapter,
    save_adapter,
)


def load_adapter(path: str | os.PathLike[str], drop_unsupported: bool = False) -> LoraAdapter:
    """Read a LoRA adapter: a PEFT directory.

    Args:
        path: a PEFT adapter directory.
        drop_unsupported: skip parts we cannot port (``modules_to_save`` copies, LoRA on
            embeddings) instead of raising; they are listed in :attr:`LoraAdapter.dropped`.

    Raises:
        AdapterError: missing or malformed files, unsupported adapter types, inconsistent ranks,
            non-finite values (the message names the file).
    """
    return read_peft_adapter(path, drop_unsupported)


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_NAME_BIN",
    "LoraAdapter",
    "LoraModule",
    "adapter_config_for",
    "load_adapter",
    "lora_scale",
    "pattern_value",
    "read_peft_adapter",
    "save_adapter",
]
