"""Pairing for diffusion LoRAs: by module name within each component, roles as data.

Unlike decoder LLMs there is no layer index to align: a UNet module is the same module in
two checkpoints of one family when it has the same diffusers name (``unet`` /
``text_encoder`` / ``text_encoder_2`` each on its own). A module the target lacks (a
distilled SSD-1B drops transformer blocks) becomes a skipped record with its reason; the
report lists it, nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from functools import cache
from importlib import resources

from ..adapters import LoraAdapter, LoraModule
from ..errors import AdapterError
from ..pairing import Side, Unit
from ..report import ModuleRecord
from .bases import ComponentWeights, DiffusionBase

NO_TARGET_MODULE = "target base has no such module"


@cache
def _roles() -> dict[str, dict[str, str]]:
    data = json.loads(resources.files(__package__).joinpath("roles.json").read_text())
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for component, alias in data.items():
        if isinstance(alias, str) and alias in tables:
            tables[component] = tables[alias]
    return tables


def module_role(component: str, module: str) -> str:
    """A module's role (``attn2.to_k`` -> ``cross_attn.k``) by the longest matching end of its name, else its leaf."""
    table = _roles().get(component, {})
    best = ""
    for suffix in table:
        if (module == suffix or module.endswith("." + suffix)) and len(suffix) > len(best):
            best = suffix
    return table[best] if best else module.rsplit(".", 1)[-1]


def _side(name: str, weights: ComponentWeights, module: str, shape: tuple[int, ...]) -> Side:
    flat = (int(shape[0]), math.prod(int(d) for d in shape[1:]))
    kernel = tuple(int(d) for d in shape[2:]) if len(shape) == 4 else None
    return Side(name, f"{module}.weight", None, flat, -1, weights, kernel=kernel)


class DiffusionPairing:
    """Pairs every module of a diffusion LoRA with the same-named module of the target base.

    Attributes:
        units: the pairs to port (one per module).
        unpaired: skipped records (modules or components the target lacks).
        missing_blocks: the target-less modules grouped by transformer / resnet block.
    """

    def __init__(self, adapter: LoraAdapter, src: DiffusionBase, tgt: DiffusionBase) -> None:
        self.src, self.tgt = src, tgt
        self.units: list[Unit] = []
        self.unpaired: list[ModuleRecord] = []
        self.missing_blocks: Counter[str] = Counter()
        for module in adapter.modules.values():
            self._pair(module)

    def _pair(self, lora: LoraModule) -> None:
        component, _, module = lora.name.partition(".")
        source = self.src.components.get(component)
        if source is None:
            raise AdapterError(f"adapter module {lora.name}: the source base {self.src.name} has no {component}")
        key = f"{module}.weight"
        if key not in source:
            raise AdapterError(f"adapter module {lora.name} has no weight in the source base {self.src.name}")
        shape_s = source.shape(key)
        side_s = _side(lora.name, source, module, shape_s)
        if side_s.shape != lora.shape:
            raise AdapterError(
                f"adapter does not fit the source base: module {lora.name} has an update of shape {lora.shape} "
                f"but {self.src.name} has {module} of shape {tuple(shape_s)}"
            )
        role = module_role(component, module)
        target = self.tgt.components.get(component)
        reason = None
        if target is None:
            reason = f"target base has no {component}"
        elif key not in target:
            reason = NO_TARGET_MODULE
            self.missing_blocks[_block_of(lora.name)] += 1
        elif len(target.shape(key)) not in (2, 4):
            reason = f"target weight has shape {target.shape(key)}, not a linear or conv weight"
        if reason is not None:
            self.unpaired.append(ModuleRecord(lora.name, "", role, -1, -1, lora.shape, (0, 0), "skipped", reason))
            return
        assert target is not None
        side_t = _side(lora.name, target, module, target.shape(key))
        self.units.append(Unit(side_s, side_t, role, lora, 1, 0))

    def notes(self) -> list[str]:
        """Report notes: which blocks of the source the target lacks."""
        if not self.missing_blocks:
            return []
        blocks = ", ".join(f"{b} ({n})" for b, n in sorted(self.missing_blocks.items()))
        total = sum(self.missing_blocks.values())
        count = len(self.missing_blocks)
        return [f"{total} adapted module(s) in {count} block(s) have no counterpart in the target: {blocks}"]


def _block_of(name: str) -> str:
    """``unet.down_blocks.2.attentions.1.transformer_blocks.7.attn1.to_q`` -> ``...transformer_blocks.7``."""
    parts = name.split(".")
    for marker in ("transformer_blocks", "resnets", "layers", "attentions"):
        if marker in parts:
            index = parts.index(marker)
            return ".".join(parts[: index + 2])
    return name
