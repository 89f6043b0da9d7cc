"""Merge coefficients learnt by the multi-teacher loss: the cheap student of a distilled fusion.

AdaMerging / SAMerging style: the fused adapter is the adapters' own updates side by side, each
layer's share of adapter ``i`` weighted by a learnt number ``c[layer, i]`` (``--distill-learn
coefficients``). Only those numbers train (adapters x layers of them, against a whole LoRA's
factors), by the same loss as the full student: each teacher's continuation and distributions on
its own prompts, plus the keep term. It needs the adapters on the target's own base (their
factors are used as they are) and writes an adapter of the summed rank.

The student's LoRA holds the adapters in blocks: ``A = [A_1; A_2; ...]``, ``B = [B_1 | B_2 | ...]``
(each at the student's scale, so block ``i`` alone is adapter ``i``'s update exactly); a
parametrization multiplies block ``i``'s columns of ``B`` by its layer's ``c[i]``. Start: every
``c = 1`` (task arithmetic at scaling 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch.nn.utils import parametrize

from ..adapters import LoraAdapter
from ..errors import TransferError
from .student import lora_layers

# The coefficients are numbers near 1 and the factors entries near 0.01-0.1: one Adam step moves
# each parameter by about the learning rate, so the coefficients take this many times the factors'
# learning rate (2e-3 -> 0.02: a coefficient can move by 1 in about 50 steps).
COEFFICIENT_LR_SCALE = 10.0
_LAYER = re.compile(r"\.layers?\.(\d+)\.")


class BlockScale(torch.nn.Module):
    """``B -> B * c[block of each column]``: one coefficient per adapter block (shared by a layer's modules)."""

    def __init__(self, coefficients: torch.nn.Parameter, blocks: torch.Tensor) -> None:
        super().__init__()
        self.coefficients = coefficients
        self.register_buffer("blocks", blocks, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.coefficients[self.blocks].to(weight.dtype)


def layer_group(module: str) -> str:
    """The layer a module belongs to (``layer 12``), or the module itself outside the decoder layers."""
    found = _LAYER.search(module)
    return f"layer {int(found.group(1))}" if found else module


def block_ranks(adapters: Sequence[LoraAdapter]) -> list[int]:
    """Each adapter's block width: its largest module rank."""
    return [max(m.rank for m in a.modules.values()) for a in adapters]


def learn_coefficients(
    student: torch.nn.Module, adapters: Sequence[LoraAdapter], scale: float
) -> dict[str, torch.nn.Parameter]:
    """Put ``adapters`` side by side in the student's LoRA (at the student's ``scale``), freeze the factors
    and return the coefficients to train, one vector (one entry per adapter) per layer group."""
    ranks = block_ranks(adapters)
    offsets = [sum(ranks[:i]) for i in range(len(ranks))]
    coefficients: dict[str, torch.nn.Parameter] = {}
    for name, layer in lora_layers(student).items():
        A_w, B_w = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if A_w.shape[0] != sum(ranks):
            raise TransferError(
                f"--distill-learn coefficients: the student's rank {A_w.shape[0]} is not the adapters' summed "
                f"rank {sum(ranks)} (leave --rank unset)"
            )
        blocks = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)).to(B_w.device)
        with torch.no_grad():
            A_w.zero_()
            B_w.zero_()
            for adapter, offset in zip(adapters, offsets, strict=True):
                module = adapter.modules.get(name)
                if module is None:
                    continue
                root = math.sqrt(module.scale / scale)  # block alone: scale * B A = module.scale * B_i A_i
                A_w[offset : offset + module.rank] = (module.A.float() * root).to(A_w)
                B_w[:, offset : offset + module.rank] = (module.B.float() * root).to(B_w)
        A_w.requires_grad_(False)
        B_w.requires_grad_(False)
        group = layer_group(name)
        if group not in coefficients:
            coefficients[group] = torch.nn.Parameter(torch.ones(len(adapters), device=B_w.device))
        parametrize.register_parametrization(layer.lora_B["default"], "weight", BlockScale(coefficients[group], blocks))
    return {f"{group}.coefficients": value for group, value in coefficients.items()}


def fold_coefficients(student: torch.nn.Module) -> None:
    """Multiply the learnt coefficients into ``B`` and drop the parametrizations (the factors are then plain)."""
    for layer in lora_layers(student).values():
        linear = layer.lora_B["default"]
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)


def coefficient_table(params: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """The learnt coefficients by layer group and adapter name (for the report)."""
    return {
        key.removesuffix(".coefficients"): {n: round(float(v), 4) for n, v in zip(names, value.detach(), strict=True)}
        for key, value in params.items()
    }


__all__ = [
    "COEFFICIENT_LR_SCALE",
    "BlockScale",
    "block_ranks",
    "coefficient_table",
    "fold_coefficients",
    "layer_group",
    "learn_coefficients",
]
