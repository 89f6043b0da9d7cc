"""Image-model LoRA files: kohya / sd-scripts, diffusers, and PEFT per component.

In memory a diffusion LoRA is a :class:`~loraport.adapters.LoraAdapter` whose module names
are ``<component>.<diffusers module name>`` (``unet.down_blocks.0.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``), conv factors flattened
(:attr:`~loraport.adapters.LoraModule.kernel`), plus what the file said about itself
(:class:`DiffusionLora`).

- **kohya** (one ``.safetensors``): ``lora_unet_<flattened module>``, ``lora_te_*`` (SD-1/2),
  ``lora_te1_*`` / ``lora_te2_*`` (SDXL); ``.lora_down.weight`` = ``A`` (``(r, in)`` or
  ``(r, in, kh, kw)``), ``.lora_up.weight`` = ``B`` (``(out, r)`` or ``(out, r, 1, 1)``),
  ``.alpha`` (default: the rank); ``ss_*`` metadata. Flattened names are resolved by
  enumerating the base model's module names (diffusers names and, for the UNet, sgm names
  ``input_blocks_4_1_...``), as sd-scripts and ComfyUI do; never by guessing where the dots were.
- **diffusers** (``pytorch_lora_weights.safetensors``): ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight``, ``text_encoder.`` / ``text_encoder_2.`` likewise; ranks and alphas in the
  ``lora_adapter_metadata`` header entry (``unet.r``, ``unet.lora_alpha``,
  ``unet.rank_pattern``, ``unet.alpha_pattern``); without it alpha = rank, as diffusers reads it.
- **peft**: one PEFT adapter directory per component (``unet/adapter_config.json``, ...).

Refused with a clear error (or dropped and listed with ``drop_unsupported``): LyCORIS
LoHa / LoKr / OFT / (IA)^3 / full-diff modules, Tucker ``lora_mid``, DoRA (``dora_scale``,
``lora_magnitude_vector``), trained biases, textual-inversion embeddings bundled in the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

from ..adapters import (
    CONFIG_NAME,
    LoraAdapter,
    LoraModule,
    adapter_config_for,
    load_adapter,
    pattern_value,
    save_adapter,
)
from ..errors import AdapterError, TransferError
from .bases import CLIP_TOP, COMPONENTS, DiffusionBase

FORMATS = ("kohya", "diffusers", "peft")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora.safetensors"  # the file name used when a kohya LoRA is written into a directory
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# kohya prefix -> component
KOHYA_PREFIXES = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
# Parts of kohya / LyCORIS module entries we do not port, by key suffix: what they are.
_UNSUPPORTED_PARTS = (
    ("hada_", "LoHa (LyCORIS)"),
    ("lokr_", "LoKr (LyCORIS)"),
    ("lora_mid", "LoRA with a Tucker mid factor (lora_mid)"),
    ("dora_scale", "DoRA (dora_scale)"),
    ("oft_", "OFT"),
    ("diff", "a full weight difference (LyCORIS full / diff)"),
    ("on_input", "(IA)^3"),
    ("w_norm", "norm tuning (LyCORIS)"),
    ("b_norm", "norm tuning (LyCORIS)"),
    ("bias", "a trained bias"),
)
_KOHYA_KEY = re.compile(r"^(?P<name>lora_[A-Za-z0-9_]+)\.(?P<part>.+)$")
_DIFFUSERS_KEY = re.compile(
    r"^(?P<component>unet|text_encoder|text_encoder_2)\.(?P<module>.+?)\."
    r"(?:lora_(?P<which>[AB])(?:\.default)?\.(?P<param>weight|bias)|(?P<alpha>alpha)|(?P<dora>lora_magnitude_vector)\S*)$"
)


@dataclass
class DiffusionLora:
    """A diffusion LoRA read from a file.

    Attributes:
        adapter: modules named ``<component>.<diffusers module>`` (without a base to resolve
            kohya names: the kohya names themselves).
        format: ``kohya``, ``diffusers`` or ``peft``.
        metadata: the safetensors header metadata (kohya ``ss_*``, diffusers' adapter metadata).
        unet_names: kohya only: ``diffusers`` (``down_blocks_0_...``) or ``sgm`` (``input_blocks_4_1_...``).
        path: the file or directory read.
        dropped: tensors or modules not loaded (``drop_unsupported``), with why.
    """

    adapter: LoraAdapter
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    unet_names: str = "diffusers"
    path: Path | None = None
    dropped: dict[str, str] = field(default_factory=dict)


# -- detection ------------------------------------------------------------------------------


def _weights_file(root: Path) -> Path | None:
    """The LoRA file of a directory: ``pytorch_lora_weights.safetensors``, else its only ``.safetensors``."""
    if (root / DIFFUSERS_WEIGHTS).exists():
        return root / DIFFUSERS_WEIGHTS
    files = sorted(root.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def _header(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """``kohya``, ``diffusers`` or ``peft`` for a diffusion LoRA; ``None`` for anything else (a PEFT LLM adapter).

    Reads file headers only. A ``.safetensors`` file that is neither kohya nor diffusers
    is an :class:`~loraport.errors.AdapterError` (loraport reads no other single-file adapter).
    """
    root = Path(path)
    if root.is_dir():
        if any((root / component / CONFIG_NAME).exists() for component in COMPONENTS):
            return "peft"
        if (root / CONFIG_NAME).exists():
            return None
        weights = _weights_file(root)
        if weights is None:
            return None
    elif root.is_file() and root.suffix == ".safetensors":
        weights = root
    else:
        return None
    keys, _ = _header(weights)
    if any(k.startswith("lora_") for k in keys):
        return "kohya"
    if any(k.split(".", 1)[0] in COMPONENTS for k in keys):
        return "diffusers"
    raise AdapterError(
        f"{weights}: not a kohya (lora_unet_*, lora_te_*) or diffusers (unet.*, text_encoder.*) LoRA "
        f"(first key: {keys[0] if keys else 'none'})"
    )


# -- reading --------------------------------------------------------------------------------


def _why_unsupported(part: str) -> str:
    for prefix, what in _UNSUPPORTED_PARTS:
        if part.startswith(prefix):
            return what
    return f"an unknown tensor ({part})"


def _refuse_or_drop(path: Path, dropped: dict[str, str], drop_unsupported: bool) -> None:
    if dropped and not drop_unsupported:
        first = next(iter(dropped))
        raise AdapterError(
            f"{path}: {len(dropped)} module(s) or tensor(s) are not plain LoRA (first: {first}, {dropped[first]}); "
            "loraport ports only lora_down/lora_up (A/B) factors; pass --drop-unsupported to port the rest"
        )


def _checked_module(
    path: Path, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float, rslora: bool = False
) -> LoraModule:
    try:
        module = LoraModule.from_stored(name, down, up, alpha, rslora)
    except ValueError as exc:
        raise AdapterError(f"{path}: module {name}: {exc}") from None
    for which, tensor in (("down (A)", down), ("up (B)", up)):
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: module {name}: {which} contains NaN or Inf")
    return module


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc


def _adapter(modules: dict[str, LoraModule], path: Path, dropped: dict[str, str]) -> LoraAdapter:
    if not modules:
        raise AdapterError(f"{path}: no LoRA factors found")
    dtype = Counter(m.A.dtype for m in modules.values()).most_common(1)[0][0]
    return LoraAdapter(modules=modules, config={}, dtype=dtype, path=path, dropped=dict(dropped))


class KohyaNames:
    """Resolves kohya's flattened names against a base model's module names (diffusers and sgm).

    ``lora_unet_down_blocks_0_attentions_0_proj_in`` is looked up among
    ``lora_unet_ + name.replace(".", "_")`` for every module name of the base's UNet; SDXL's
    ``lora_unet_input_blocks_4_1_...`` among its sgm names, enumerated only when needed.
    """

    def __init__(self, base: DiffusionBase) -> None:
        self.base = base
        self._index: dict[str, set[tuple[str, str, str]]] = {}
        self._sgm_added = False
        for component, weights in base.components.items():
            for prefix in (p for p, c in KOHYA_PREFIXES.items() if c == component):
                for module in weights.modules():
                    self._add(f"{prefix}_{module}", (component, module, "diffusers"))

    def _add(self, dotted: str, entry: tuple[str, str, str]) -> None:
        self._index.setdefault(dotted.replace(".", "_"), set()).add(entry)

    def resolve(self, name: str) -> tuple[str, str, str] | None:
        """``(component, diffusers module, naming)`` of a kohya module name, ``None`` if the base has none.

        Raises ``AdapterError`` when two modules of the base flatten to the same name.
        """
        found = self._index.get(name)
        if found is None and name.startswith("lora_unet_") and not self._sgm_added:
            self._sgm_added = True
            for module, sgm in self.base.sgm_unet_names().items():
                self._add(f"lora_unet_{sgm}", ("unet", module, "sgm"))
            found = self._index.get(name)
        if found is None:
            return None
        modules = {entry[:2] for entry in found}
        if len(modules) > 1:
            raise AdapterError(f"kohya name {name} is ambiguous in {self.base.name}: {sorted(modules)}")
        return next(iter(found))


def read_kohya(path: Path, base: DiffusionBase | None = None, drop_unsupported: bool = False) -> DiffusionLora:
    """Read a kohya / sd-scripts LoRA file; with ``base``, names resolve to ``<component>.<module>``."""
    state = _load_state(path)
    _, metadata = _header(path)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    dropped: dict[str, str] = {}
    for key, tensor in state.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            dropped[key] = "a textual-inversion embedding" if key.startswith("bundle_emb") else "not a lora_* tensor"
            continue
        part = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}.get(match["part"])
        if part is None:
            dropped[match["name"]] = _why_unsupported(match["part"])
        else:
            entries.setdefault(match["name"], {})[part] = tensor
    for name in list(entries):
        if name in dropped:  # a LyCORIS module that also has an alpha: drop it whole
            del entries[name]
        elif not name.startswith(tuple(f"{p}_" for p in KOHYA_PREFIXES)):
            dropped[name] = f"component {name.split('_')[1]!r} (loraport ports UNet and CLIP text encoder LoRAs)"
            del entries[name]
    _refuse_or_drop(path, dropped, drop_unsupported)
    names = KohyaNames(base) if base is not None else None
    modules: dict[str, LoraModule] = {}
    styles: Counter[str] = Counter()
    unresolved: list[str] = []
    for name, parts in entries.items():
        if "A" not in parts or "B" not in parts:
            raise AdapterError(f"{path}: module {name} has no {'lora_up' if 'B' not in parts else 'lora_down'}.weight")
        rank = int(parts["A"].shape[0])
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        full = name
        if names is not None:
            resolved = names.resolve(name)
            if resolved is None:
                unresolved.append(name)
                continue
            component, module, style = resolved
            full = f"{component}.{module}"
            if component == "unet":
                styles[style] += 1
        modules[full] = _checked_module(path, full, parts["A"], parts["B"], alpha)
    if unresolved:
        assert base is not None
        raise AdapterError(
            f"{path}: {len(unresolved)} kohya module name(s) match no module of the source base {base.name} "
            f"(first: {unresolved[0]}); is this LoRA for another model?"
        )
    if styles["sgm"] and styles["diffusers"]:
        raise AdapterError(f"{path}: mixes diffusers-style and sgm-style UNet names")
    return DiffusionLora(
        _adapter(modules, path, dropped), "kohya", metadata, "sgm" if styles["sgm"] else "diffusers", path, dropped
    )


def _component_configs(metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: {DIFFUSERS_METADATA_KEY} is not valid JSON ({exc})") from exc
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        configs.setdefault(component, {})[field_name] = value
    return configs


def read_diffusers(path: Path, drop_unsupported: bool = False) -> DiffusionLora:
    """Read a diffusers LoRA file (``unet.<module>.lora_A.weight``, ...) with its adapter metadata."""
    state = _load_state(path)
    _, metadata = _header(path)
    configs = _component_configs(metadata, path)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    dropped: dict[str, str] = {}
    for key, tensor in state.items():
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            dropped[key] = "not a LoRA factor of a unet / text encoder module"
            continue
        name = f"{match['component']}.{match['module']}"
        if match["dora"]:
            dropped[name] = "DoRA (lora_magnitude_vector)"
        elif match["param"] == "bias":
            dropped[name] = "a trained bias (lora_bias)"
        else:
            entries.setdefault(name, {})[match["which"] or "alpha"] = tensor
    for config in configs.values():
        if config.get("use_dora"):
            dropped.setdefault("use_dora", "DoRA adapter")
    for name in dropped:
        entries.pop(name, None)
    _refuse_or_drop(path, dropped, drop_unsupported)
    modules: dict[str, LoraModule] = {}
    for name, parts in entries.items():
        if "A" not in parts or "B" not in parts:
            raise AdapterError(f"{path}: module {name} has no lora_{'B' if 'B' not in parts else 'A'}.weight")
        component, module = name.split(".", 1)
        config = configs.get(component, {})
        rank = int(parts["A"].shape[0])
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        if "lora_alpha" in config:
            alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        modules[name] = _checked_module(path, name, parts["A"], parts["B"], alpha, bool(config.get("use_rslora")))
    carried = {k: v for k, v in metadata.items() if k not in ("format", DIFFUSERS_METADATA_KEY)}  # diffusers' own
    return DiffusionLora(_adapter(modules, path, dropped), "diffusers", carried, path=path, dropped=dropped)


def read_peft_components(root: Path, drop_unsupported: bool = False) -> DiffusionLora:
    """Read one PEFT adapter directory per component (``root/unet``, ``root/text_encoder``, ...)."""
    modules: dict[str, LoraModule] = {}
    dropped: dict[str, str] = {}
    for component in COMPONENTS:
        if (root / component / CONFIG_NAME).exists():
            adapter = load_adapter(root / component, drop_unsupported=drop_unsupported)
            for name, module in adapter.modules.items():
                if component != "unet" and name.startswith(CLIP_TOP):  # written for a transformers >= 5 CLIPTextModel
                    name = f"text_model.{name}"
                modules[f"{component}.{name}"] = replace(module, name=f"{component}.{name}")
            dropped.update({f"{component}.{k}": v for k, v in adapter.dropped.items()})
    return DiffusionLora(_adapter(modules, root, dropped), "peft", path=root, dropped=dropped)


def read_diffusion_lora(
    path: str | os.PathLike[str], base: DiffusionBase | None = None, drop_unsupported: bool = False
) -> DiffusionLora:
    """Read a diffusion LoRA in any supported format (kohya names resolve against ``base``)."""
    root = Path(path)
    fmt = detect_format(root)
    if fmt is None:
        raise AdapterError(f"{root}: not a kohya, diffusers or per-component PEFT LoRA")
    if fmt == "peft":
        return read_peft_components(root, drop_unsupported)
    weights = root if root.is_file() else _weights_file(root)
    assert weights is not None
    if fmt == "kohya":
        return read_kohya(weights, base, drop_unsupported)
    return read_diffusers(weights, drop_unsupported)


# -- writing --------------------------------------------------------------------------------


def _by_component(modules: dict[str, LoraModule]) -> dict[str, dict[str, LoraModule]]:
    groups: dict[str, dict[str, LoraModule]] = {}
    for name, module in modules.items():
        component, _, inner = name.partition(".")
        groups.setdefault(component, {})[inner] = replace(module, name=inner)
    return groups


def _component_config(modules: dict[str, LoraModule], base_name: str | None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields of one component: most common rank / alpha, patterns for the rest."""
    adapter = LoraAdapter(modules=modules, config={})
    return adapter_config_for(adapter, base_name, sorted(modules))


def kohya_name(name: str, target: DiffusionBase | None, unet_names: str) -> str:
    """The kohya name of ``<component>.<module>`` for ``target`` (``lora_te1`` / ``lora_te2`` with two encoders).

    Without ``target``, ``name`` must be a kohya name already (a kohya LoRA read without a base).
    """
    if target is None:
        if not name.startswith(tuple(f"{p}_" for p in KOHYA_PREFIXES)):
            raise TransferError(f"{name}: writing a kohya name needs the base model")
        return name
    component, _, module = name.partition(".")
    if component == "unet":
        if unet_names == "sgm":
            sgm = target.sgm_unet_names().get(module)
            if sgm is None:
                raise TransferError(f"{name}: no sgm name in {target.name} (write diffusers-style kohya names instead)")
            module = sgm
        prefix = "lora_unet"
    elif component == "text_encoder":
        prefix = "lora_te1" if "text_encoder_2" in target.components else "lora_te"
    elif component == "text_encoder_2":
        prefix = "lora_te2"
    else:
        raise TransferError(f"{name}: component {component!r} has no kohya prefix")
    return f"{prefix}_{module}".replace(".", "_")


def _data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sd-scripts' ``sshs_model_hash``: SHA-256 of a safetensors file's bytes after its header."""
    data = save(tensors)
    header = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[header:]).hexdigest()


def _kohya_metadata(
    source: dict[str, str], modules: dict[str, LoraModule], provenance: dict[str, str]
) -> dict[str, str]:
    """The source's ``ss_*`` metadata, updated: network dim / alpha of what is written, base-model hashes removed."""
    meta = {k: v for k, v in source.items() if k != DIFFUSERS_METADATA_KEY}
    for stale in ("sshs_model_hash", "sshs_legacy_hash", "ss_sd_model_hash", "ss_new_sd_model_hash"):
        meta.pop(stale, None)
    ranks = Counter(m.rank for m in modules.values())
    rank = ranks.most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values() if m.rank == rank).most_common(1)[0][0]
    meta["ss_network_dim"] = str(rank)
    meta["ss_network_alpha"] = f"{alpha:g}"
    if "ss_sd_model_name" in meta or provenance.get("loraport_target_base"):
        meta["ss_sd_model_name"] = Path(provenance.get("loraport_target_base", "")).name or meta.get(
            "ss_sd_model_name", ""
        )
    meta.update(provenance)
    return meta


def write_kohya(
    path: Path,
    modules: dict[str, LoraModule],
    target: DiffusionBase | None,
    unet_names: str,
    metadata: dict[str, str],
    provenance: dict[str, str],
    dtype: torch.dtype,
) -> Path:
    """Write a kohya LoRA file (``lora_down`` / ``lora_up`` / ``alpha``) for ``target`` (see :func:`kohya_name`)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        key = kohya_name(name, target, unet_names)
        A, B = module.stored_factors()
        tensors[f"{key}.lora_down.weight"] = A.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = B.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=dtype)
    meta = _kohya_metadata(metadata, modules, provenance)
    if "sshs_model_hash" in metadata:
        meta["sshs_model_hash"] = _data_sha256(tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


def write_diffusers(
    path: Path, modules: dict[str, LoraModule], metadata: dict[str, str], provenance: dict[str, str], dtype: torch.dtype
) -> Path:
    """Write a diffusers LoRA file; ranks and alphas go to ``lora_adapter_metadata`` (read by load_lora_weights).

    Text encoder modules keep ``text_model.`` in the tensor keys (diffusers drops it for a
    transformers >= 5 ``CLIPTextModel``), but not in the metadata's ``target_modules`` and
    patterns, which PEFT matches as name endings: so they match with and without it.
    """
    tensors: dict[str, torch.Tensor] = {}
    adapter_metadata: dict[str, Any] = {}
    for component, own in _by_component(modules).items():
        relative = {n.removeprefix("text_model.") if component != "unet" else n: m for n, m in own.items()}
        config = _component_config(relative, None)
        for field_name in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora"):
            adapter_metadata[f"{component}.{field_name}"] = config[field_name]
        for name, module in own.items():
            A, B = module.stored_factors()
            tensors[f"{component}.{name}.lora_A.weight"] = A.detach().to("cpu", dtype).contiguous()
            tensors[f"{component}.{name}.lora_B.weight"] = B.detach().to("cpu", dtype).contiguous()
    meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    meta.update(provenance)
    meta["format"] = "pt"
    meta[DIFFUSERS_METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def write_peft_components(
    root: Path, modules: dict[str, LoraModule], target: DiffusionBase, dtype: torch.dtype
) -> Path:
    """Write one PEFT adapter directory per component under ``root`` (loadable with ``PeftModel.from_pretrained``).

    Module names are those of the target's files (:meth:`ComponentWeights.stored_name`), so a
    model loaded from them has those modules.
    """
    for component, own in _by_component(modules).items():
        weights = target.components[component]
        named = {weights.stored_name(n): replace(m, name=weights.stored_name(n)) for n, m in own.items()}
        adapter = LoraAdapter(modules=named, config={}, dtype=dtype)
        config = _component_config(named, f"{target.name}/{component}")
        save_adapter(adapter, root / component, config=config)
    return root


def default_file_name(fmt: str) -> str:
    """The weights file of a LoRA written into a directory."""
    return DIFFUSERS_WEIGHTS if fmt == "diffusers" else KOHYA_WEIGHTS
