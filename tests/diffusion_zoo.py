"""Tiny Stable Diffusion bases and kohya LoRAs for the diffusion tests, built once per session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraport.zoo.tiny_diffusion import make_random_kohya_lora, make_tiny_sd, perturb_sd, save_single_file

# The real SD-1.5 and SDXL UNet configs (module structure only: built on the meta device).
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def make_skeleton(path: Path, unet_config: dict, clip_layers: tuple[int, ...]) -> Path:
    """A diffusers folder with the real module names and ``(1,) * ndim`` tensors: names and ranks, no weights.

    ``clip_layers``: layer counts of the text encoders (12: CLIP-L; 12, 32: SDXL's CLIP-L and bigG).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from loraport.zoo.tiny_diffusion import tiny_clip_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    _save_skeleton(path / "unet", dict(unet.named_parameters()), {"layers_per_block": unet_config["layers_per_block"]})
    for index, layers in enumerate(clip_layers):
        cls = CLIPTextModel if index == 0 else CLIPTextModelWithProjection
        with torch.device("meta"):
            model = cls(tiny_clip_config(hidden=8, layers=layers))
        _save_skeleton(path / ("text_encoder" if index == 0 else "text_encoder_2"), dict(model.named_parameters()), {})
    return path


def _save_skeleton(folder: Path, params: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True)
    state = {name: torch.zeros((1,) * p.ndim) for name, p in params.items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


class SDZoo:
    """Lazily built tiny SD bases and LoRAs under one session directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def _once(self, name: str, build: Callable[[Path], Path]) -> Path:
        if name not in self._built:
            self._built[name] = build(self.root / name)
        return self._built[name]

    @property
    def sd1(self) -> Path:
        return self._once("sd1", lambda p: make_tiny_sd(p, "sd1", seed=0))

    @property
    def sd1_derivative(self) -> Path:
        return self._once("sd1-d", lambda p: perturb_sd(self.sd1, p, 0.1))

    @property
    def sd1_linear(self) -> Path:
        """SD-1 shapes but linear ``proj_in`` / ``proj_out`` (as SDXL and SD-2.1 have)."""
        return self._once("sd1-linear", lambda p: make_tiny_sd(p, "sd1", seed=3, use_linear_projection=True))

    @property
    def sd1_lora(self) -> Path:
        return self._once("sd1-lora.safetensors", lambda p: make_random_kohya_lora(self.sd1, p, rank=4, conv=True))

    @property
    def sd1_single(self) -> Path:
        return self._once("sd1.safetensors", lambda p: save_single_file(self.sd1, p))

    @property
    def sdxl(self) -> Path:
        return self._once("sdxl", lambda p: make_tiny_sd(p, "sdxl", seed=1))

    @property
    def sdxl_derivative(self) -> Path:
        return self._once("sdxl-d", lambda p: perturb_sd(self.sdxl, p, 0.1, seed=2))

    @property
    def sdxl_distilled(self) -> Path:
        """SSD-1B-like: the deepest level keeps one of its two transformer blocks."""
        return self._once("sdxl-ssd", lambda p: make_tiny_sd(p, "sdxl", seed=4, transformer_layers_per_block=(1, 1)))

    @property
    def sdxl_lora(self) -> Path:
        return self._once("sdxl-lora.safetensors", lambda p: make_random_kohya_lora(self.sdxl, p, rank=4, conv=True))

    @property
    def sdxl_single(self) -> Path:
        return self._once("sdxl.safetensors", lambda p: save_single_file(self.sdxl, p))

    @property
    def sd15_names(self) -> Path:
        return self._once("sd15-skeleton", lambda p: make_skeleton(p, SD15_UNET, (12,)))

    @property
    def sdxl_names(self) -> Path:
        return self._once("sdxl-skeleton", lambda p: make_skeleton(p, SDXL_UNET, (12, 32)))
