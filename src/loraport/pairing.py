"""Pairing: which target module (or fused part of one) each source adapter module goes to.

Source modules are parsed with the source architecture's role map, checked against the
source base (the adapter must fit it), mapped to target layers (relative depth or an
explicit map) and to the target module holding the same role. Fused modules are ported
whole when both sides have the same parts of the same sizes, otherwise split by role.
"""

from __future__ import annotations

from dataclasses import dataclass

from .adapters import LoraAdapter, LoraModule
from .architectures import KNOWN, Architecture, ModuleSpec, architecture_for, relative_layer_map
from .checkpoints import Checkpoint, TensorSource
from .errors import AdapterError, CheckpointError, TransferError
from .report import ModuleRecord


@dataclass
class Side:
    """One module (or one fused part of it) on one side of a pairing.

    Attributes:
        module: the module's name (what the output adapter calls it).
        key: the tensor name of its weight in ``checkpoint``.
        rows: the part's rows inside a fused module's weight (``None``: the whole module).
        shape: ``(out, in)`` of this part; a conv weight ``(out, in, kh, kw)`` counts as
            ``(out, in * kh * kw)`` (SPEC sec. 11).
        layer: decoder layer index (``-1`` where layers do not apply).
        checkpoint: where the weight is read from.
        transposed: the weight is stored ``(in, out)`` (GPT-2 ``Conv1D``).
        module_rows: output rows of the whole module when this side is one fused part
            (``None``: ``shape[0]``).
        kernel: a conv weight's spatial kernel ``(kh, kw)`` (``None``: a linear weight).
    """

    module: str
    key: str
    rows: tuple[int, int] | None
    shape: tuple[int, int]
    layer: int
    checkpoint: TensorSource
    transposed: bool = False
    module_rows: int | None = None
    kernel: tuple[int, ...] | None = None

    @property
    def out_rows(self) -> int:
        """Output rows of the whole module this side belongs to."""
        return self.module_rows if self.module_rows is not None else self.shape[0]


@dataclass
class Unit:
    source: Side
    target: Side
    role: str
    source_module: LoraModule
    target_parts: int  # how many parts the target module has (1 = plain)
    part_index: int


def linear_shape(ckpt: TensorSource, key: str, transposed: bool) -> tuple[int, int]:
    """``(out, in)`` of a matrix stored as is, or transposed (GPT-2 ``Conv1D``)."""
    shape = ckpt.shape(key)
    if len(shape) != 2:
        raise CheckpointError(f"{ckpt.name}: {key} has shape {shape}, expected a matrix")
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def layer_count(arch: Architecture, ckpt: Checkpoint) -> int:
    count = arch.num_layers(ckpt.config)
    if count is not None:
        return count
    layers = [parsed[0] for key in ckpt.keys() if (parsed := arch.parse(key.removesuffix(".weight")))]
    if not layers:
        raise CheckpointError(f"{ckpt.name}: cannot find any {arch.name} decoder layer")
    return max(layers) + 1


class Pairing:
    """Pairs every source adapter module (or fused part) with its target module."""

    def __init__(
        self, adapter: LoraAdapter, src: Checkpoint, tgt: Checkpoint, layer_map: dict[int, int] | None = None
    ) -> None:
        self.src, self.tgt = src, tgt
        self.arch_s = self._arch(src)
        self.arch_t = self._arch(tgt)
        self.layers_s = layer_count(self.arch_s, src)
        self.layers_t = layer_count(self.arch_t, tgt)
        if layer_map is not None:
            bad = [f"{t}:{s}" for t, s in layer_map.items() if not (0 <= t < self.layers_t and 0 <= s < self.layers_s)]
            if bad:
                raise TransferError(
                    f"--layer-map pairs out of range (target has {self.layers_t} layers, source "
                    f"{self.layers_s}): {', '.join(bad)}"
                )
            self.layer_map = dict(layer_map)
        else:
            self.layer_map = relative_layer_map(self.layers_s, self.layers_t)
        self.units: list[Unit] = []
        self.unpaired: list[ModuleRecord] = []
        self._pair(adapter)

    @staticmethod
    def _arch(ckpt: Checkpoint) -> Architecture:
        shapes = None
        if ckpt.model_type is None or ckpt.model_type not in KNOWN:
            shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
        return architecture_for(ckpt.config, shapes)

    def _source_side(self, module: LoraModule) -> tuple[int, ModuleSpec, str] | None:
        parsed = self.arch_s.parse(module.name)
        if parsed is None:
            return None
        key = self.src.resolve_module(module.name)
        if key is None:
            raise AdapterError(f"adapter module {module.name} has no weight in the source base {self.src.name}")
        shape = linear_shape(self.src, key, self.arch_s.transposed)
        if shape != module.shape:
            raise AdapterError(
                f"adapter does not fit the source base: module {module.name} has an update of shape "
                f"{module.shape} but {self.src.name} has {key} of shape {shape} (out x in)"
            )
        return parsed[0], parsed[1], key

    def _target_rows(self, spec: ModuleSpec, name: str, key: str) -> tuple[tuple[int, int], list[slice]]:
        shape = linear_shape(self.tgt, key, self.arch_t.transposed)
        return shape, self.arch_t.part_rows(spec, self.tgt.config, shape[0], name)

    def _pair(self, adapter: LoraAdapter) -> None:
        by_layer: dict[int, list[tuple[LoraModule, ModuleSpec, str]]] = {}
        for module in adapter.modules.values():
            found = self._source_side(module)
            if found is None:
                self.unpaired.append(
                    ModuleRecord(
                        module.name,
                        "",
                        "",
                        -1,
                        -1,
                        module.shape,
                        (0, 0),
                        "skipped",
                        "not a decoder-layer projection of the source architecture",
                    )
                )
                continue
            layer, spec, key = found
            by_layer.setdefault(layer, []).append((module, spec, key))
        used_source_layers = set(self.layer_map.values())
        for layer in sorted(set(by_layer) - used_source_layers):
            for module, _, _ in by_layer[layer]:
                self.unpaired.append(
                    ModuleRecord(
                        module.name,
                        "",
                        "",
                        layer,
                        -1,
                        module.shape,
                        (0, 0),
                        "skipped",
                        "source layer has no target layer in the layer map",
                    )
                )
        for t_layer, s_layer in sorted(self.layer_map.items()):
            for module, spec_s, key_s in by_layer.get(s_layer, []):
                self._pair_module(module, spec_s, key_s, s_layer, t_layer)

    def _pair_module(self, module: LoraModule, spec_s: ModuleSpec, key_s: str, s_layer: int, t_layer: int) -> None:
        m_s, n_s = module.shape
        rows_s = self.arch_s.part_rows(spec_s, self.src.config, m_s, module.name)
        first = self.arch_t.locate(spec_s.roles[0])
        whole = False
        if first is not None and first[0].roles == spec_s.roles and first[0].fused == spec_s.fused:
            spec_t = first[0]
            name_t = self.arch_t.module_name(t_layer, spec_t.suffix)
            key_t = self.tgt.resolve_module(name_t)
            if key_t is not None:
                shape_t, rows_t = self._target_rows(spec_t, name_t, key_t)
                sizes_s = [s.stop - s.start for s in rows_s]
                sizes_t = [s.stop - s.start for s in rows_t]
                # Same parts of the same sizes: port the module as a whole.
                whole = not spec_s.fused or sizes_s == sizes_t
                if whole:
                    self.units.append(
                        Unit(
                            Side(module.name, key_s, None, (m_s, n_s), s_layer, self.src, self.arch_s.transposed),
                            Side(name_t, key_t, None, shape_t, t_layer, self.tgt, self.arch_t.transposed),
                            "+".join(spec_s.roles),
                            module,
                            1,
                            0,
                        )
                    )
        if whole:
            return
        for (role, _), rows in zip(spec_s.parts, rows_s, strict=True):
            source = Side(
                module.name,
                key_s,
                None if not spec_s.fused else (rows.start, rows.stop),
                (rows.stop - rows.start, n_s),
                s_layer,
                self.src,
                self.arch_s.transposed,
                m_s if spec_s.fused else None,
            )
            located = self.arch_t.locate(role)
            if located is None:
                self.unpaired.append(
                    ModuleRecord(
                        module.name,
                        "",
                        role,
                        s_layer,
                        t_layer,
                        source.shape,
                        (0, 0),
                        "skipped",
                        f"target architecture {self.arch_t.name} has no {role} module",
                    )
                )
                continue
            spec_t, index = located
            name_t = self.arch_t.module_name(t_layer, spec_t.suffix)
            key_t = self.tgt.resolve_module(name_t)
            if key_t is None:
                self.unpaired.append(
                    ModuleRecord(
                        module.name,
                        name_t,
                        role,
                        s_layer,
                        t_layer,
                        source.shape,
                        (0, 0),
                        "skipped",
                        f"target base has no weight for {name_t}",
                    )
                )
                continue
            shape_t, rows_t = self._target_rows(spec_t, name_t, key_t)
            part = rows_t[index]
            target = Side(
                name_t,
                key_t,
                None if not spec_t.fused else (part.start, part.stop),
                (part.stop - part.start, shape_t[1]),
                t_layer,
                self.tgt,
                self.arch_t.transposed,
                shape_t[0] if spec_t.fused else None,
            )
            self.units.append(Unit(source, target, role, module, len(spec_t.parts), index))
