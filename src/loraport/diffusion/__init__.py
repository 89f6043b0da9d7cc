"""Image-model LoRAs: kohya / diffusers / PEFT formats, Stable Diffusion bases, pairing by module name.

Public API::

    from loraport import transfer
    transfer("style.safetensors", "runs/sd15", "runs/sd15-finetune", out="style-ported.safetensors")

    from loraport.diffusion import DiffusionBase, read_diffusion_lora
    base = DiffusionBase.open("runs/sdxl.safetensors")          # a single-file checkpoint
    lora = read_diffusion_lora("style.safetensors", base)        # kohya names resolved against it

diffusers is needed for single-file checkpoints and SDXL (sgm) names: ``pip install 'loraport[diffusion]'``.
"""

from __future__ import annotations

from .bases import COMPONENTS, ComponentWeights, DiffusionBase
from .formats import FORMATS, DiffusionLora, KohyaNames, detect_format, read_diffusion_lora
from .pairing import DiffusionPairing, module_role
from .port import transfer_diffusion

__all__ = [
    "COMPONENTS",
    "FORMATS",
    "ComponentWeights",
    "DiffusionBase",
    "DiffusionLora",
    "DiffusionPairing",
    "KohyaNames",
    "detect_format",
    "module_role",
    "read_diffusion_lora",
    "transfer_diffusion",
]
