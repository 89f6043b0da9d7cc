"""Lazy, one-tensor-at-a-time readers for base-model checkpoints.

A :class:`Checkpoint` reads ``config.json`` and the tensor index of a model directory
(single or sharded safetensors, or pickle ``.bin`` files loaded with ``weights_only=True``)
without loading any weights; a :class:`GGUFCheckpoint` does the same for a ``.gguf`` file
(llama.cpp's format), dequantizing one tensor at a time. Tensors are read on demand with
:meth:`Checkpoint.get`; :meth:`Checkpoint.open` picks the reader.

Example::

    >>> ckpt = Checkpoint.open("Qwen/Qwen2.5-1.5B")          # doctest: +SKIP
    >>> ckpt.shape("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    (1536, 1536)
    >>> Checkpoint.open("SmolLM2-135M-Instruct.Q4_1.gguf").get("model.layers.0.self_attn.q_proj.weight").dtype
    torch.float32                                              # doctest: +SKIP
"""

from __future__ import annotations

from .base import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    SIDE_FILES,
    Checkpoint,
    TensorSource,
    resolve_model_dir,
)
from .gguf import GGUFCheckpoint, find_gguf

__all__ = [
    "BIN_INDEX",
    "BIN_SINGLE",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "SIDE_FILES",
    "Checkpoint",
    "GGUFCheckpoint",
    "TensorSource",
    "find_gguf",
    "resolve_model_dir",
]
