"""Tiny random Stable Diffusion bases and kohya LoRAs, built on the fly (tests, benchmarks).

- :func:`make_tiny_sd`: a diffusers folder with a tiny ``UNet2DConditionModel`` and CLIP
  text encoder(s): ``"sd1"`` (1x1-conv ``proj_in`` / ``proj_out``, one text encoder) or
  ``"sdxl"`` (linear projections, two transformer blocks in the deepest level, size / crop
  conditioning, a second text encoder with projection).
- :func:`save_single_file`: the same weights as one ``.safetensors`` file in the original
  layouts (ldm / sgm UNet names, ``cond_stage_model`` / ``conditioner.embedders`` text
  encoders, OpenCLIP's fused ``in_proj_weight`` for SDXL's second encoder).
- :func:`make_random_kohya_lora`: a kohya LoRA with random factors on every attention,
  feed-forward and projection module (optionally LoCon on the resnet convs), named the way
  sd-scripts names them (flattened module paths; sgm names for SDXL).

Example::

    >>> base = make_tiny_sd("/tmp/sd", "sd1")                          # doctest: +SKIP
    >>> make_random_kohya_lora(base, "/tmp/lora.safetensors", rank=4)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CLIP_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
UNET_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
VOCAB = 64


def tiny_unet_config(style: str = "sd1", **overrides: Any) -> dict[str, Any]:
    """Config of a tiny ``UNet2DConditionModel`` in the ``sd1`` or ``sdxl`` style."""
    config: dict[str, Any] = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if style == "sdxl":
        config.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(4, 8),
            use_linear_projection=True,
            cross_attention_dim=64,  # both encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 size / crop ids + the pooled text embedding
        )
    elif style != "sd1":
        raise ValueError(f"style must be sd1 or sdxl, got {style!r}")
    config.update(overrides)
    return config


def tiny_clip_config(hidden: int = 32, layers: int = 2, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        projection_dim=projection or hidden,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_tiny_sd(path: str | os.PathLike[str], style: str = "sd1", seed: int = 0, **unet: Any) -> Path:
    """A diffusers folder (``unet/``, ``text_encoder/``, SDXL: ``text_encoder_2/``) with random weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(path)
    torch.manual_seed(seed)
    UNet2DConditionModel(**tiny_unet_config(style, **unet)).save_pretrained(str(root / "unet"))
    CLIPTextModel(tiny_clip_config()).save_pretrained(str(root / "text_encoder"))
    if style == "sdxl":
        CLIPTextModelWithProjection(tiny_clip_config(projection=32)).save_pretrained(str(root / "text_encoder_2"))
    classes = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    if style == "sdxl":
        classes["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", **classes}))
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def perturb_sd(source: str | os.PathLike[str], path: str | os.PathLike[str], drift: float, seed: int = 1) -> Path:
    """Copy a tiny SD folder with every linear / conv weight moved by ``drift`` relative Frobenius norm (low rank)."""
    import shutil

    source, root = Path(source), Path(path)
    shutil.copytree(source, root)
    generator = torch.Generator().manual_seed(seed)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        file = next(folder.glob("*.safetensors"))
        state = load_file(str(file))
        for key, W in state.items():
            if key.endswith(".weight") and W.ndim in (2, 4):
                flat = W.flatten(1)
                m, n = flat.shape
                r = max(1, min(m, n) // 4)
                G = torch.randn(m, r, generator=generator) @ torch.randn(r, n, generator=generator)
                state[key] = (flat + G * (drift * flat.norm() / G.norm())).reshape(W.shape)
        save_file(state, str(file), metadata={"format": "pt"})
    return root


def save_single_file(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Write a tiny SD folder as one single-file checkpoint in the original (ldm / sgm, OpenCLIP) layouts."""
    from ..diffusion.bases import CLIP_TOP, LDM_UNET_PREFIX, diffusers_to_sgm_names

    root = Path(folder)
    unet = _weights(root / "unet")
    config = json.loads((root / "unet" / "config.json").read_text())
    modules = {key.rsplit(".", 1)[0] for key in unet}
    sgm = diffusers_to_sgm_names(modules, config["layers_per_block"])
    state: dict[str, torch.Tensor] = {}
    for key, tensor in unet.items():
        module, _, param = key.rpartition(".")
        state[f"{LDM_UNET_PREFIX}{sgm[module]}.{param}"] = tensor
    two = (root / "text_encoder_2").is_dir()
    prefix = "conditioner.embedders.0.transformer." if two else "cond_stage_model.transformer."
    # Original checkpoints name CLIP weights as transformers < 5 did (text_model.encoder...).
    clip = {(f"text_model.{k}" if k.startswith(CLIP_TOP) else k): v for k, v in _weights(root / "text_encoder").items()}
    state.update({prefix + k: v for k, v in clip.items()})
    if two:
        state.update(_open_clip_state(_weights(root / "text_encoder_2"), "conditioner.embedders.1.model."))
    save_file(state, str(path), metadata={"format": "pt"})
    return Path(path)


def _open_clip_state(clip: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights in OpenCLIP names (fused ``in_proj``), as SDXL files store them."""
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[3]) for k in clip if k.startswith("text_model.encoder.layers.")})
    renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            parts = [clip[f"{src}self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(parts, dim=0)
            for old, new in renames.items():
                out[f"{dst}{new}.{param}"] = clip[f"{src}{old}.{param}"]
    out[f"{prefix}token_embedding.weight"] = clip["text_model.embeddings.token_embedding.weight"]
    out[f"{prefix}positional_embedding"] = clip["text_model.embeddings.position_embedding.weight"]
    out[f"{prefix}ln_final.weight"] = clip["text_model.final_layer_norm.weight"]
    out[f"{prefix}ln_final.bias"] = clip["text_model.final_layer_norm.bias"]
    out[f"{prefix}text_projection"] = clip["text_projection.weight"].T.contiguous()
    return out


def _targets(names: list[str], suffixes: tuple[str, ...]) -> list[str]:
    return [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]


def make_random_kohya_lora(
    base: str | os.PathLike[str],
    path: str | os.PathLike[str],
    rank: int = 4,
    alpha: float = 2.0,
    conv: bool = False,
    text_encoders: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A kohya LoRA for a tiny SD folder: random down / up / alpha, named as sd-scripts names them.

    Attention, feed-forward and ``proj_in`` / ``proj_out`` modules of the UNet (sgm names
    when the base has two text encoders, as sd-scripts' SDXL networks), CLIP q/k/v/out and
    fc1/fc2 (``lora_te_`` or ``lora_te1_`` / ``lora_te2_``); ``conv=True`` adds LoCon factors
    (``(r, in, 3, 3)`` / ``(out, r, 1, 1)``) on the resnet and sampler convs.
    """
    from ..diffusion.bases import DiffusionBase

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    with DiffusionBase.open(base) as sd:
        sdxl = "text_encoder_2" in sd.components
        groups: list[tuple[str, str, dict[str, tuple[int, ...]]]] = []
        unet = sd.components["unet"].modules()
        names = _targets(list(unet), UNET_TARGETS + (CONV_TARGETS if conv else ()))
        sgm = sd.sgm_unet_names() if sdxl else {}
        groups.append(("lora_unet", "unet", {sgm.get(n, n): unet[n] for n in names}))
        if text_encoders:
            prefixes = (("text_encoder", "lora_te1" if sdxl else "lora_te"), ("text_encoder_2", "lora_te2"))
            for component, prefix in prefixes:
                if component in sd.components:
                    own = sd.components[component].modules()
                    groups.append((prefix, component, {n: own[n] for n in _targets(list(own), CLIP_TARGETS)}))
        for prefix, _, modules in groups:
            for module, shape in modules.items():
                key = f"{prefix}_{module}".replace(".", "_")
                down_shape = (rank, *shape[1:])
                up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
                down = torch.randn(down_shape, generator=generator) / (torch.tensor(down_shape[1:]).prod() ** 0.5)
                tensors[f"{key}.lora_down.weight"] = down.to(dtype)
                tensors[f"{key}.lora_up.weight"] = (torch.randn(up_shape, generator=generator) / rank**0.5).to(dtype)
                tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}"}
    save_file(tensors, str(path), metadata={**metadata, "ss_sd_model_name": Path(base).name})
    return Path(path)
