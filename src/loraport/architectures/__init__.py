"""Architectures as data: which modules of a decoder layer play which role.

Each ``*.json`` file in this folder describes one family: the layer prefix
(``model.layers.${layer}``), where the layer count lives in ``config.json``, whether the
weights are stored transposed (GPT-2 ``Conv1D``), and for each adapted module its path in
the layer and its *role* (``attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down``).
``post_norms`` names the norms some families (Gemma 2 and 3) apply to a residual-writing
module's output before it joins the residual stream. Fused modules (Phi-3 ``qkv_proj``,
GPT-2 ``c_attn``) list their parts as
``[role, size]`` row blocks, the size named by a config quantity (``q_dim``, ``kv_dim``,
``hidden``, ``intermediate``).

Unknown ``model_type`` values are inferred from tensor names (with a warning).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import CheckpointError, TransferError

log = logging.getLogger(__name__)

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")

# Leaf names seen in the wild, for architectures we have no file for.
_LEAF_ROLES = {
    "q_proj": "attn.q",
    "query": "attn.q",
    "wq": "attn.q",
    "k_proj": "attn.k",
    "key": "attn.k",
    "wk": "attn.k",
    "v_proj": "attn.v",
    "value": "attn.v",
    "wv": "attn.v",
    "o_proj": "attn.o",
    "out_proj": "attn.o",
    "wo": "attn.o",
    "dense": "attn.o",
    "gate_proj": "mlp.gate",
    "w1": "mlp.gate",
    "up_proj": "mlp.up",
    "w3": "mlp.up",
    "fc1": "mlp.up",
    "c_fc": "mlp.up",
    "down_proj": "mlp.down",
    "w2": "mlp.down",
    "fc2": "mlp.down",
}


@dataclass(frozen=True)
class ModuleSpec:
    """A module inside a decoder layer.

    Attributes:
        suffix: path inside the layer, e.g. ``self_attn.qkv_proj``.
        parts: ``(role, size_name)`` row blocks; a plain module has one part whose size
            name is ``""`` (the whole output).
    """

    suffix: str
    parts: tuple[tuple[str, str], ...]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for role, _ in self.parts)


@dataclass
class Architecture:
    """Role map of one model family (see the module docstring)."""

    name: str
    layer_prefix: str
    modules: dict[str, ModuleSpec]
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    transposed: bool = False
    inferred: bool = False
    # role -> the norm applied to that module's output before the residual add (Gemma 2/3).
    post_norms: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        head, _, _ = self.layer_prefix.partition("${layer}")
        self._container = head.rstrip(".").rsplit(".", 1)[-1]
        suffixes = "|".join(re.escape(s) for s in sorted(self.modules, key=len, reverse=True))
        self._module_re = re.compile(rf"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<suffix>{suffixes})$")
        self._roles: dict[str, tuple[ModuleSpec, int]] = {}
        for spec in self.modules.values():
            for index, (role, _) in enumerate(spec.parts):
                self._roles[role] = (spec, index)

    # -- naming -------------------------------------------------------------------------
    def module_name(self, layer: int, suffix: str) -> str:
        """Full module path, e.g. ``model.layers.3.self_attn.q_proj``."""
        return f"{self.layer_prefix.replace('${layer}', str(layer))}.{suffix}"

    def parse(self, module_name: str) -> tuple[int, ModuleSpec] | None:
        """``(layer, spec)`` of a module path, or ``None`` if it is not an adaptable module.

        Tolerates wrapper prefixes (``base_model.model.``) as long as the layer container
        name (``layers``, ``h``) precedes the index.
        """
        match = self._module_re.match(module_name)
        if match is None:
            return None
        prefix = match["prefix"].rstrip(".")
        if prefix.rsplit(".", 1)[-1] != self._container:
            return None
        return int(match["layer"]), self.modules[match["suffix"]]

    def locate(self, role: str) -> tuple[ModuleSpec, int] | None:
        """The module holding ``role`` and the index of its part (``None`` if absent)."""
        return self._roles.get(role)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self._roles)

    # -- sizes --------------------------------------------------------------------------
    def num_layers(self, config: dict[str, Any]) -> int | None:
        for key in self.num_layers_keys:
            value = _config_get(config, key)
            if isinstance(value, int):
                return value
        return None

    def part_rows(self, spec: ModuleSpec, config: dict[str, Any], total: int, module: str) -> list[slice]:
        """Row slices of the parts of ``spec`` in a weight with ``total`` output rows."""
        if not spec.fused:
            return [slice(0, total)]
        dims = derived_dims(config)
        sizes: list[int] = []
        for role, size_name in spec.parts:
            size = dims.get(size_name)
            if size is None:
                raise CheckpointError(
                    f"{module}: cannot split fused module into {role}: config.json lacks what {size_name} needs"
                )
            sizes.append(size)
        if sum(sizes) != total:
            raise CheckpointError(
                f"{module}: fused parts {dict(zip(spec.roles, sizes, strict=True))} sum to {sum(sizes)} rows, "
                f"but the weight has {total}"
            )
        slices, start = [], 0
        for size in sizes:
            slices.append(slice(start, start + size))
            start += size
        return slices


def _config_get(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def derived_dims(config: dict[str, Any]) -> dict[str, int]:
    """Named sizes used by fused modules: ``hidden, q_dim, kv_dim, intermediate``."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def first(*names: str) -> Any:
        for name in names:
            if isinstance(cfg.get(name), int):
                return cfg[name]
        return None

    dims: dict[str, int] = {}
    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    if hidden:
        dims["hidden"] = hidden
        inter = first("intermediate_size", "n_inner", "ffn_dim")
        dims["intermediate"] = inter if inter else 4 * hidden
    if hidden and heads:
        head_dim = first("head_dim") or hidden // heads
        kv_heads = first("num_key_value_heads") or heads
        dims["q_dim"] = heads * head_dim
        dims["kv_dim"] = kv_heads * head_dim
    return dims


def _from_json(data: dict[str, Any]) -> Architecture:
    modules: dict[str, ModuleSpec] = {}
    for suffix, entry in data["modules"].items():
        if "parts" in entry:
            parts = tuple((str(role), str(size)) for role, size in entry["parts"])
        else:
            parts = ((str(entry["role"]), ""),)
        modules[suffix] = ModuleSpec(suffix, parts)
    return Architecture(
        name=data["name"],
        layer_prefix=data["layer_prefix"],
        modules=modules,
        num_layers_keys=tuple(data.get("num_layers", ["num_hidden_layers"])),
        transposed=bool(data.get("transposed", False)),
        post_norms=dict(data.get("post_norms", {})),
    )


def _load_known() -> dict[str, Architecture]:
    known: dict[str, Architecture] = {}
    for entry in resources.files(__package__).iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            arch = _from_json(data)
            for model_type in data["model_types"]:
                known[model_type] = arch
    return known


KNOWN: dict[str, Architecture] = _load_known()


def infer_architecture(shapes: dict[str, tuple[int, ...]]) -> Architecture:
    """Guess the role map from tensor names (``<prefix>.<layer>.<path>.weight``, 2-D).

    The most common layer prefix wins; module leaf names are mapped to roles by a table of
    common names (``q_proj``, ``query``, ``wq``, ...); other modules keep their own path as
    role, so they still pair with the same path in another model.
    """
    pattern = re.compile(r"^(?P<prefix>.+?)\.(?P<layer>\d+)\.(?P<suffix>.+)\.weight$")
    prefixes: Counter[str] = Counter()
    suffixes: dict[str, set[str]] = {}
    for key, shape in shapes.items():
        match = pattern.match(key)
        if match is None or len(shape) != 2:
            continue
        prefixes[match["prefix"]] += 1
        suffixes.setdefault(match["prefix"], set()).add(match["suffix"])
    if not prefixes:
        raise CheckpointError("cannot infer the architecture: no '<prefix>.<layer>.<module>.weight' matrices found")
    prefix = prefixes.most_common(1)[0][0]
    modules: dict[str, ModuleSpec] = {}
    used: set[str] = set()
    for suffix in sorted(suffixes[prefix]):
        role = _LEAF_ROLES.get(suffix.rsplit(".", 1)[-1], suffix)
        if role in used:  # two modules claim one role: keep them apart by path
            role = suffix
        used.add(role)
        modules[suffix] = ModuleSpec(suffix, ((role, ""),))
    arch = Architecture(name="inferred", layer_prefix=f"{prefix}.${{layer}}", modules=modules, inferred=True)
    arch.notes.append(f"architecture inferred from tensor names (layer prefix {prefix!r})")
    return arch


def architecture_for(config: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None) -> Architecture:
    """The role map for a model, by ``config.json`` ``model_type``, else inferred.

    Args:
        config: the model's ``config.json``.
        shapes: tensor name -> shape, needed only when the type is unknown.
    """
    model_type = config.get("model_type")
    if model_type in KNOWN:
        return KNOWN[model_type]
    if shapes is None:
        raise CheckpointError(f"unknown model_type {model_type!r} and no tensor names to infer from")
    arch = infer_architecture(shapes)
    log.warning("model_type %r is not known to loraport; %s", model_type, arch.notes[0])
    return arch


def relative_layer_map(source_layers: int, target_layers: int) -> dict[int, int]:
    """Target layer -> source layer by relative depth.

    ``i_s = round(i_t * (L_s - 1) / (L_t - 1))``; equal depths map each layer to itself.
    """
    if source_layers <= 0 or target_layers <= 0:
        raise TransferError("layer counts must be positive")
    if target_layers == 1:
        return {0: 0}
    ratio = (source_layers - 1) / (target_layers - 1)
    # Python's round() is banker's rounding; relative depth wants round-half-up.
    return {t: int(t * ratio + 0.5) for t in range(target_layers)}


def parse_layer_map(text: str) -> dict[int, int]:
    """Parse ``--layer-map`` text: ``"0:0,1:2,2:4"`` (target:source pairs)."""
    result: dict[int, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            target, source = (int(x) for x in item.split(":"))
        except ValueError:
            raise TransferError(f"--layer-map: {item!r} is not TARGET:SOURCE (two integers)") from None
        result[target] = source
    if not result:
        raise TransferError("--layer-map is empty")
    return result
