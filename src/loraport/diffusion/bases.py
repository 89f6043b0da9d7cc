"""Stable Diffusion base models, read lazily: diffusers folders and single-file checkpoints.

A base is a set of *components* (``unet``, ``text_encoder``, ``text_encoder_2``), each
presented as a :class:`ComponentWeights`: its weights under **diffusers names**
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``), read one tensor
at a time from wherever they are stored:

- a diffusers folder: ``unet/diffusion_pytorch_model.safetensors``,
  ``text_encoder/model.safetensors``, ... (names used as they are);
- a single-file checkpoint (``.safetensors``) in the original layouts: ldm / sgm UNet
  (``model.diffusion_model.input_blocks.4.1...``), CLIP text encoders
  (``cond_stage_model.transformer.*``, ``conditioner.embedders.0.transformer.*``) and
  OpenCLIP ones (``cond_stage_model.model.*``, ``conditioner.embedders.1.model.*``, whose
  fused ``in_proj_weight`` is read as the row blocks ``q_proj`` / ``k_proj`` / ``v_proj``).

The ldm -> diffusers UNet name map comes from diffusers' own converter
(``convert_ldm_unet_checkpoint``) run on the checkpoint's tensor *names* (no tensor is
read); the diffusers -> sgm map, which kohya SDXL LoRAs need, is derived from the UNet's
module names and ``layers_per_block`` and checked by running that converter back. Nothing
is guessed from strings. diffusers is imported only where a map is needed (the
``[diffusion]`` extra).

Example::

    >>> base = DiffusionBase.open("runs/sd15")                     # doctest: +SKIP
    >>> unet = base.components["unet"]                              # doctest: +SKIP
    >>> unet.shape("down_blocks.0.attentions.0.proj_in.weight")      # doctest: +SKIP
    (320, 320, 1, 1)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import Checkpoint, resolve_model_dir
from ..errors import CheckpointError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
LDM_UNET_PREFIX = "model.diffusion_model."
PARAMS = ("weight", "bias")  # the converter moves a sampler's bias with its weight
CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm.")  # what transformers >= 5 saves without text_model.
# Single-file text encoder prefixes -> (component, layout). CLIP keys are transformers' own
# names after the prefix; OpenCLIP keys (SD-2, SDXL's second encoder) are renamed.
TEXT_ENCODER_PREFIXES = {
    "cond_stage_model.transformer.": ("text_encoder", "clip"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "clip"),
    "cond_stage_model.model.": ("text_encoder", "open_clip"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "open_clip"),
    "conditioner.embedders.0.model.": ("text_encoder_2", "open_clip"),  # SDXL refiner
}
# ResnetBlock2D: diffusers name -> ldm name (inverse of diffusers' update_unet_resnet_ldm_to_diffusers).
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _import_diffusers_converters() -> Any:
    try:
        from diffusers.loaders import single_file_utils
    except ImportError as exc:
        raise CheckpointError(
            "reading single-file checkpoints and sgm (SDXL) names needs diffusers: pip install 'loraport[diffusion]'"
        ) from exc
    return single_file_utils


@dataclass(frozen=True)
class Located:
    """Where one diffusers-named tensor is stored: its name in the file, and its rows for a block of a fused tensor."""

    key: str
    rows: tuple[int, int] | None = None


class ComponentWeights:
    """One component's weights under diffusers names, read lazily (a :class:`~loraport.checkpoints.TensorSource`).

    Attributes:
        name: ``"<base>:<component>"``, for messages.
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        config: the component's ``config.json`` (empty for single-file checkpoints).
    """

    def __init__(
        self,
        name: str,
        component: str,
        checkpoint: Checkpoint,
        names: dict[str, Located] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.component = component
        self.checkpoint = checkpoint
        self._names = names  # None: the checkpoint's names are diffusers names already
        self.config = config or {}

    def _locate(self, key: str) -> Located:
        if self._names is None:
            if key not in self.checkpoint:
                raise CheckpointError(f"{self.name}: no tensor named {key!r}")
            return Located(key)
        try:
            return self._names[key]
        except KeyError:
            raise CheckpointError(f"{self.name}: no tensor named {key!r}") from None

    def keys(self) -> list[str]:
        """All tensor names (diffusers names)."""
        return self.checkpoint.keys() if self._names is None else list(self._names)

    def __contains__(self, key: object) -> bool:
        return key in (self.checkpoint if self._names is None else self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        located = self._locate(key)
        shape = self.checkpoint.shape(located.key)
        if located.rows is not None:
            shape = (located.rows[1] - located.rows[0], *shape[1:])
        return shape

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        located = self._locate(key)
        if located.rows is not None:
            start = located.rows[0]
            rows = located.rows if rows is None else (start + rows[0], start + rows[1])
        return self.checkpoint.get(located.key, rows)

    def fingerprint(self, key: str) -> str:
        located = self._locate(key)
        return f"{self.checkpoint.fingerprint(located.key)}|rows={located.rows}"

    def file_of(self, key: str) -> Path:
        return self.checkpoint.file_of(self._locate(key).key)

    def stored_name(self, module: str) -> str:
        """A module's name in this component's files (diffusers folders; single files: the diffusers name).

        It differs only for text encoders saved by transformers >= 5 (no ``text_model.``);
        PEFT adapters written for this base use it.
        """
        if self._names is None or self.checkpoint.root.is_file():
            return module
        return self._locate(f"{module}.weight").key.removesuffix(".weight")

    def modules(self) -> dict[str, tuple[int, ...]]:
        """Module name -> weight shape, for every linear (2-D) and conv (4-D) weight."""
        found: dict[str, tuple[int, ...]] = {}
        for key in self.keys():
            if key.endswith(".weight"):
                shape = self.shape(key)
                if len(shape) in (2, 4):
                    found[key.removesuffix(".weight")] = shape
        return found


class DiffusionBase:
    """A Stable Diffusion base model: its components under diffusers names.

    Attributes:
        name: what the user passed (folder, file or hub id).
        layout: ``"diffusers"`` (a folder) or ``"single_file"``.
        components: component name -> :class:`ComponentWeights` (only those present).
    """

    def __init__(self, name: str, layout: str, components: dict[str, ComponentWeights]) -> None:
        self.name = name
        self.layout = layout
        self.components = components
        self._sgm: dict[str, str] | None = None

    @classmethod
    def open(cls, name_or_path: str | os.PathLike[str]) -> DiffusionBase:
        """Open a diffusers folder (``unet/``, ``text_encoder/``, ...), a single ``.safetensors`` file or a hub id."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: single-file checkpoints must be .safetensors (pickles are not read)")
            return cls._open_single_file(path, str(name_or_path))
        root = resolve_model_dir(name_or_path)
        components: dict[str, ComponentWeights] = {}
        for component in COMPONENTS:
            folder = root / component
            if folder.is_dir() and any(folder.glob("*.safetensors")):
                checkpoint = Checkpoint(folder, f"{name_or_path}/{component}")
                components[component] = ComponentWeights(
                    f"{name_or_path}:{component}", component, checkpoint, _clip_names(checkpoint), checkpoint.config
                )
        if "unet" not in components:
            raise CheckpointError(
                f"{root}: not a Stable Diffusion base (expected a diffusers folder with unet/*.safetensors, "
                "or a single-file .safetensors checkpoint)"
            )
        return cls(str(name_or_path), "diffusers", components)

    @classmethod
    def _open_single_file(cls, path: Path, name: str) -> DiffusionBase:
        checkpoint = Checkpoint(path, name)
        keys = checkpoint.keys()
        components: dict[str, ComponentWeights] = {}
        unet_keys = [k for k in keys if k.startswith(LDM_UNET_PREFIX)]
        if not unet_keys:
            raise CheckpointError(
                f"{path}: no {LDM_UNET_PREFIX}* tensors (not a Stable Diffusion single-file checkpoint)"
            )
        components["unet"] = ComponentWeights(
            f"{name}:unet", "unet", checkpoint, {k: Located(v) for k, v in ldm_unet_names(unet_keys).items()}
        )
        for prefix, (component, layout) in TEXT_ENCODER_PREFIXES.items():
            own = [k for k in keys if k.startswith(prefix)]
            if not own or component in components:
                continue
            if layout == "clip":
                names = {k.removeprefix(prefix): Located(k) for k in own}
            else:
                names = open_clip_names(own, prefix, checkpoint.shape)
            components[component] = ComponentWeights(f"{name}:{component}", component, checkpoint, names)
        return cls(name, "single_file", components)

    def sgm_unet_names(self) -> dict[str, str]:
        """diffusers UNet module name -> sgm module name (``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``)."""
        if self._sgm is None:
            unet = self.components["unet"]
            modules = list(unet.modules())
            if self.layout == "single_file":
                self._sgm = {
                    module: unet._locate(f"{module}.weight").key.removeprefix(LDM_UNET_PREFIX).removesuffix(".weight")
                    for module in modules
                }
            else:
                self._sgm = diffusers_to_sgm_names(modules, _layers_per_block(unet.config, self.name))
        return self._sgm

    def close(self) -> None:
        for component in self.components.values():
            component.checkpoint.close()

    def __enter__(self) -> DiffusionBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clip_names(checkpoint: Checkpoint) -> dict[str, Located] | None:
    """Names for a text encoder saved by transformers >= 5, whose ``CLIPTextModel`` has no ``text_model.`` level.

    LoRA files (kohya ``lora_te_text_model_encoder_...``, diffusers ``text_encoder.text_model...``)
    use the ``text_model.`` names, so those are the names loraport uses; ``None`` when the
    files have them already (or for the UNet).
    """
    keys = checkpoint.keys()
    if any(k.startswith("text_model.") for k in keys) or not any(k.startswith("encoder.layers.") for k in keys):
        return None
    return {(f"text_model.{k}" if k.startswith(CLIP_TOP) else k): Located(k) for k in keys}


def _layers_per_block(config: dict[str, Any], name: str) -> int:
    value = config.get("layers_per_block")
    if isinstance(value, list | tuple) and value and all(v == value[0] for v in value):
        value = value[0]
    if not isinstance(value, int):
        raise CheckpointError(f"{name}: unet/config.json needs one integer layers_per_block, got {value!r}")
    return value


# -- ldm / sgm names ----------------------------------------------------------------------


def ldm_layers_per_block(ldm_names: Iterable[str]) -> int:
    """``layers_per_block`` of an ldm UNet, from its ``input_blocks`` (a downsampler closes each block)."""
    blocks: set[int] = set()
    downsamplers: set[int] = set()
    for name in ldm_names:
        match = re.match(r"(?:model\.diffusion_model\.)?input_blocks\.(\d+)\.0\.(op\.)?", name)
        if match and int(match[1]) > 0:
            blocks.add(int(match[1]))
            if match[2]:
                downsamplers.add(int(match[1]))
    if not blocks:
        raise CheckpointError("ldm UNet without input_blocks: cannot derive layers_per_block")
    first = min(downsamplers) if downsamplers else max(blocks) + 1
    return first - 1


def ldm_unet_names(ldm_keys: list[str]) -> dict[str, str]:
    """diffusers tensor name -> ldm tensor name for a single-file UNet, by diffusers' own converter.

    The converter is run on a state dict whose *values are the key names*, so it reads no
    tensor; ``layers_per_block`` comes from the names (:func:`ldm_layers_per_block`).
    """
    converters = _import_diffusers_converters()
    inner = [k.removeprefix(LDM_UNET_PREFIX) for k in ldm_keys]
    config: dict[str, Any] = {"layers_per_block": ldm_layers_per_block(inner)}
    if "label_emb.0.0.weight" in inner:  # SDXL's size / crop conditioning
        config["addition_embed_type"] = "text_time"
    converted = converters.convert_ldm_unet_checkpoint({k: k for k in ldm_keys}, config)
    return {str(k): str(v) for k, v in converted.items() if isinstance(v, str)}


def diffusers_to_sgm_names(modules: Iterable[str], layers_per_block: int) -> dict[str, str]:
    """diffusers UNet module name -> ldm / sgm module name (the layout kohya SDXL LoRAs use).

    The inverse of diffusers' ``convert_ldm_unet_checkpoint``, from the block structure:
    down block ``b``, layer ``j`` is ``input_blocks.{1 + b (L + 1) + j}`` (``.0`` resnet,
    ``.1`` attention; its downsampler ``input_blocks.{(b + 1)(L + 1)}.0.op``), the middle block
    is ``middle_block.{0, 1, 2}``, up block ``b`` layer ``j`` is ``output_blocks.{b (L + 1) + j}``
    with its upsampler after the attention. The result is checked by running the converter
    back on it; a module it does not map back exactly is left out.
    """
    modules = list(modules)
    L = layers_per_block
    up_with_attention = {
        int(m.split(".")[1]) for m in modules if m.startswith("up_blocks.") and m.split(".")[2] == "attentions"
    }
    converters = _import_diffusers_converters()
    top = {
        d.removesuffix(".weight"): ldm.removesuffix(".weight")
        for table in ("layers", "addition_embed_type")
        for d, ldm in converters.DIFFUSERS_TO_LDM_MAPPING["unet"][table].items()
        if d.endswith(".weight")
    }
    result: dict[str, str] = {}
    for module in modules:
        parts = module.split(".")
        head: str | None = None
        rest = parts[4:]
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 4:
            block, kind, index = int(parts[1]), parts[2], int(parts[3])
            down = parts[0] == "down_blocks"
            first = 1 + block * (L + 1) if down else block * (L + 1)
            if kind == "resnets":
                head = f"{'input_blocks' if down else 'output_blocks'}.{first + index}.0"
                rest = _resnet_to_ldm(rest)
            elif kind == "attentions":
                head = f"{'input_blocks' if down else 'output_blocks'}.{first + index}.1"
            elif kind == "downsamplers" and rest == ["conv"]:
                head, rest = f"input_blocks.{first + L}.0", ["op"]
            elif kind == "upsamplers":
                head = f"output_blocks.{first + L}.{2 if block in up_with_attention else 1}"
        elif parts[0] == "mid_block" and len(parts) >= 3:
            kind, index = parts[1], int(parts[2])
            rest = parts[3:]
            if kind == "resnets":
                head, rest = f"middle_block.{2 * index}", _resnet_to_ldm(rest)
            elif kind == "attentions":
                head = f"middle_block.{2 * index + 1}"
        if head is not None:
            result[module] = ".".join([head, *rest])
        elif module in top:
            result[module] = top[module]
    # Check: diffusers' converter must map every produced name back to its module (it counts the
    # input blocks from the names, so conv_in's input_blocks.0 must be there).
    state = {
        f"{LDM_UNET_PREFIX}{ldm}.{param}": f"{module}.{param}" for module, ldm in result.items() for param in PARAMS
    }
    back = converters.convert_ldm_unet_checkpoint(state, {"layers_per_block": L})
    return {
        module: ldm
        for module, ldm in result.items()
        if back.get(f"{module}.weight") == f"{module}.weight" or module in top  # top: diffusers' own table
    }


def _resnet_to_ldm(rest: list[str]) -> list[str]:
    if not rest:
        return rest
    return [*_RESNET_TO_LDM.get(rest[0], rest[0]).split("."), *rest[1:]]


def open_clip_names(keys: list[str], prefix: str, shape_of: Any) -> dict[str, Located]:
    """diffusers (transformers CLIP) name -> location, for an OpenCLIP text encoder's tensors.

    Renames with diffusers' own table (``resblocks.N`` -> ``text_model.encoder.layers.N``,
    ``attn`` -> ``self_attn``, ``c_fc`` -> ``fc1``, ...); the fused ``attn.in_proj_weight``
    ``(3 d, d)`` becomes ``q_proj`` / ``k_proj`` / ``v_proj``, rows ``[0, d)``, ``[d, 2d)``, ``[2d, 3d)``.
    Only the transformer layers are mapped (LoRAs adapt nothing else).
    """
    converters = _import_diffusers_converters()
    table = converters.DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]
    names: dict[str, Located] = {}
    for key in keys:
        if not key.startswith(prefix + "transformer."):
            continue
        name = key.removeprefix(prefix + "transformer.")
        for new, old in table.items():
            name = name.replace(old, new)
        if name.endswith(".in_proj_weight"):
            d = int(shape_of(key)[1])
            stem = name.removesuffix(".in_proj_weight")
            for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
                names[f"{stem}.{part}.weight"] = Located(key, (i * d, (i + 1) * d))
        elif not name.endswith(".in_proj_bias"):
            names[name] = Located(key)
    return names
