"""The in-memory LoRA adapter that every reader returns and every writer takes.

A LoRA module's update is ``dW = scale * B @ A`` with ``B: (m, r)``, ``A: (r, n)`` in
``torch.nn.Linear`` layout (out x in), ``scale = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``). Every format is read into this layout (PEFT stores it as is, also for GPT-2
``Conv1D`` layers; a GGUF LoRA stores it in llama.cpp's row order, undone on reading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class LoraModule:
    """One adapted linear module.

    Attributes:
        name: module path in the model, e.g. ``model.layers.0.self_attn.q_proj``.
        A: ``(r, n)`` down-projection.
        B: ``(m, r)`` up-projection.
        alpha: the module's ``lora_alpha``.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        kernel: for a LoRA on a conv layer, its kernel ``(kh, kw)``: ``A`` is kept flattened,
            ``(r, in * kh * kw)``, and stored as ``(r, in, kh, kw)``, ``B`` as ``(out, r, 1, 1)``
            (SPEC sec. 11); ``None`` for a linear layer.
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    use_rslora: bool = False
    kernel: tuple[int, ...] | None = None

    @classmethod
    def from_stored(
        cls, name: str, A: torch.Tensor, B: torch.Tensor, alpha: float, use_rslora: bool = False
    ) -> LoraModule:
        """A module from factors as files store them: 2-D (linear) or 4-D (conv, flattened here).

        Raises ``ValueError`` when the shapes do not form a rank-r product
        (``A: (r, in[, kh, kw])``, ``B: (out, r[, 1, 1])``).
        """
        conv = A.ndim == 4 and B.ndim == 4 and tuple(B.shape[2:]) == (1, 1)
        if not (conv or (A.ndim == 2 and B.ndim == 2)) or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"down {tuple(A.shape)} and up {tuple(B.shape)} do not form a rank-r product "
                "(expected A: (r, in) and B: (out, r), or conv A: (r, in, kh, kw) and B: (out, r, 1, 1))"
            )
        if conv:
            return cls(name, A.flatten(1), B.flatten(1), alpha, use_rslora, kernel=tuple(A.shape[2:]))
        return cls(name, A, B, alpha, use_rslora)

    def stored_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in the layout files store them (4-D for a conv module)."""
        if self.kernel is None:
            return self.A, self.B
        rank = self.rank
        return self.A.reshape(rank, -1, *self.kernel), self.B.reshape(-1, rank, 1, 1)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the update (out x in)."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``scale * B @ A`` (for tests and small models only)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass
class LoraAdapter:
    """A LoRA adapter: its modules and the config it was read from.

    Attributes:
        modules: module path -> :class:`LoraModule`, in file order.
        config: the PEFT ``adapter_config.json`` as read (for a format without one, as built from
            the file's metadata); used as the template when writing PEFT.
        dtype: storage dtype of the factors.
        path: the directory it was read from, if any.
        dropped: names of parts that were not loaded (``drop_unsupported=True``), with why.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any]
    dtype: torch.dtype = torch.float32
    path: Path | None = None
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling factor: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


__all__ = ["LoraAdapter", "LoraModule", "lora_scale"]
