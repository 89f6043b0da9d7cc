"""Image-model LoRA formats: kohya / diffusers / PEFT readers and writers, kohya name resolution, SD bases."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraport import AdapterError, LoraportError
from loraport.diffusion import DiffusionBase, KohyaNames, detect_format, read_diffusion_lora
from loraport.diffusion.formats import read_diffusers, write_diffusers, write_kohya, write_peft_components

# Real kohya / sd-scripts module names (as in published SD-1.5 and SDXL LoRA / LoCon files) and the
# diffusers modules they adapt.
SD15_NAMES = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": "unet.down_blocks.0.attentions.0.proj_in",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ),
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0": (
        "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0"
    ),
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj": (
        "unet.down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"
    ),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": (
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    ),
    "lora_unet_up_blocks_3_attentions_2_proj_out": "unet.up_blocks.3.attentions.2.proj_out",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    ),
    "lora_unet_down_blocks_0_resnets_0_conv1": "unet.down_blocks.0.resnets.0.conv1",
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj": "unet.down_blocks.1.resnets.0.time_emb_proj",
    "lora_unet_down_blocks_2_downsamplers_0_conv": "unet.down_blocks.2.downsamplers.0.conv",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "unet.up_blocks.0.upsamplers.0.conv",
    "lora_unet_up_blocks_1_resnets_2_conv_shortcut": "unet.up_blocks.1.resnets.2.conv_shortcut",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    "lora_te_text_model_encoder_layers_11_self_attn_out_proj": (
        "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"
    ),
}
SDXL_NAMES = {
    "lora_unet_input_blocks_4_1_proj_in": "unet.down_blocks.1.attentions.0.proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k": (
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k"
    ),
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": (
        "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"
    ),
    "lora_unet_middle_block_1_transformer_blocks_5_attn2_to_v": (
        "unet.mid_block.attentions.0.transformer_blocks.5.attn2.to_v"
    ),
    "lora_unet_middle_block_1_proj_out": "unet.mid_block.attentions.0.proj_out",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0": (
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    ),
    "lora_unet_output_blocks_5_1_proj_out": "unet.up_blocks.1.attentions.2.proj_out",
    "lora_unet_input_blocks_1_0_in_layers_2": "unet.down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_7_0_emb_layers_1": "unet.down_blocks.2.resnets.0.time_emb_proj",
    "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
    "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_8_0_skip_connection": "unet.up_blocks.2.resnets.2.conv_shortcut",
    "lora_unet_output_blocks_8_0_out_layers_3": "unet.up_blocks.2.resnets.2.conv2",
    "lora_unet_time_embed_0": "unet.time_embedding.linear_1",
    "lora_unet_label_emb_0_0": "unet.add_embedding.linear_1",
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    ),
    "lora_te2_text_model_encoder_layers_31_mlp_fc2": "text_encoder_2.text_model.encoder.layers.31.mlp.fc2",
    "lora_te2_text_model_encoder_layers_7_self_attn_q_proj": (
        "text_encoder_2.text_model.encoder.layers.7.self_attn.q_proj"
    ),
}


def _resolved(base: DiffusionBase, names: dict[str, str]) -> dict[str, str | None]:
    index = KohyaNames(base)
    return {name: (None if (found := index.resolve(name)) is None else f"{found[0]}.{found[1]}") for name in names}


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_real_kohya_names_resolve_in_folders_and_single_files(sd_zoo, tmp_path, which: str) -> None:
    from loraport.zoo.tiny_diffusion import save_single_file

    folder = sd_zoo.sd15_names if which == "sd15" else sd_zoo.sdxl_names
    names = SD15_NAMES if which == "sd15" else SDXL_NAMES
    single = save_single_file(folder, tmp_path / "model.safetensors")
    for path in (folder, single):
        with DiffusionBase.open(path) as base:
            assert _resolved(base, names) == names, path
            assert KohyaNames(base).resolve("lora_unet_down_blocks_9_attentions_0_proj_in") is None


def test_sgm_names_agree_with_diffusers_converter(sd_zoo) -> None:
    """Our diffusers -> sgm map, run back through diffusers' own ldm converter, is the identity."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with DiffusionBase.open(sd_zoo.sdxl_names) as base:
        sgm = base.sgm_unet_names()
        modules = base.components["unet"].modules()
    assert set(sgm) == set(modules)  # every linear / conv module has an sgm name
    state = {f"model.diffusion_model.{ldm}.{p}": f"{m}.{p}" for m, ldm in sgm.items() for p in ("weight", "bias")}
    back = convert_ldm_unet_checkpoint(state, {"layers_per_block": 2, "addition_embed_type": "text_time"})
    assert all(back[f"{m}.weight"] == f"{m}.weight" for m in sgm)


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_single_file_reads_as_the_folder(sd_zoo, style: str) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    folder = sd_zoo.sd1 if style == "sd1" else sd_zoo.sdxl
    single = sd_zoo.sd1_single if style == "sd1" else sd_zoo.sdxl_single
    # The fixture is a valid original-layout file: diffusers' converters give back the folder's weights.
    state = load_file(str(single))
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    converted = convert_ldm_unet_checkpoint(state, json.loads((folder / "unet" / "config.json").read_text()))
    assert set(converted) == set(unet) and all(torch.equal(converted[k], unet[k]) for k in unet)
    if style == "sdxl":
        te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        converted = convert_open_clip_checkpoint(te2, state, prefix="conditioner.embedders.1.model.")
        reference = te2.state_dict()
        assert all(torch.equal(converted[k], reference[k]) for k in converted if "layers" in k)
    with DiffusionBase.open(folder) as a, DiffusionBase.open(single) as b:
        assert set(a.components) == set(b.components)
        for component, weights in a.components.items():
            modules = weights.modules()
            other = b.components[component].modules()
            assert set(modules) - {"text_projection", *(m for m in modules if "embedding" in m)} <= set(other)
            for module in other:
                assert torch.equal(weights.get(f"{module}.weight"), b.components[component].get(f"{module}.weight"))
        if style == "sdxl":  # q_proj rows [0, d) of OpenCLIP's fused in_proj_weight
            q = "text_model.encoder.layers.1.self_attn.q_proj.weight"
            assert b.components["text_encoder_2"].get(q, (2, 5)).shape == (3, 32)
            assert torch.equal(
                b.components["text_encoder_2"].get(q, (2, 5)), a.components["text_encoder_2"].get(q)[2:5]
            )


def _tensors(path):
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_kohya_to_diffusers_to_kohya_round_trip_is_exact(sd_zoo, tmp_path, style: str) -> None:
    folder = sd_zoo.sd1 if style == "sd1" else sd_zoo.sdxl
    source = sd_zoo.sd1_lora if style == "sd1" else sd_zoo.sdxl_lora
    with DiffusionBase.open(folder) as base:
        lora = read_diffusion_lora(source, base)
        assert lora.format == "kohya" and lora.unet_names == ("sgm" if style == "sdxl" else "diffusers")
        assert any(m.kernel == (3, 3) for m in lora.adapter.modules.values())  # LoCon
        kernels = {m.kernel for n, m in lora.adapter.modules.items() if n.endswith(".proj_in")}
        assert kernels == {(1, 1) if style == "sd1" else None}  # a 1x1 conv in SD-1.x, linear in SDXL
        write_diffusers(tmp_path / "d.safetensors", lora.adapter.modules, lora.metadata, {}, torch.float32)
        back = read_diffusion_lora(tmp_path / "d.safetensors")
        assert back.format == "diffusers"
        write_kohya(
            tmp_path / "k.safetensors", back.adapter.modules, base, lora.unet_names, back.metadata, {}, torch.float32
        )
    original, meta_a = _tensors(source)
    again, meta_b = _tensors(tmp_path / "k.safetensors")
    assert set(original) == set(again)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    assert {k: v for k, v in meta_a.items() if k != "ss_sd_model_name"} == {
        k: v for k, v in meta_b.items() if k != "ss_sd_model_name"
    }


def test_diffusers_metadata_carries_per_module_ranks_and_alphas(sd_zoo, tmp_path) -> None:
    with DiffusionBase.open(sd_zoo.sd1) as base:
        lora = read_diffusion_lora(sd_zoo.sd1_lora, base)
    modules = dict(lora.adapter.modules)
    first, second = list(modules)[:2]
    modules[first] = type(modules[first])(first, modules[first].A[:2], modules[first].B[:, :2], 7.0)
    modules[second].alpha = 0.5
    write_diffusers(tmp_path / "d.safetensors", modules, {}, {}, torch.float32)
    meta = json.loads(safe_open(str(tmp_path / "d.safetensors"), "pt").metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 2
    back = read_diffusers(tmp_path / "d.safetensors").adapter.modules
    for name, module in modules.items():
        assert back[name].rank == module.rank and back[name].scale == pytest.approx(module.scale), name
    # Without the metadata, diffusers' convention: alpha = rank (scale 1).
    state = load_file(str(tmp_path / "d.safetensors"))
    save_file(state, str(tmp_path / "bare.safetensors"))
    assert all(m.scale == 1.0 for m in read_diffusers(tmp_path / "bare.safetensors").adapter.modules.values())


def test_peft_components_round_trip(sd_zoo, tmp_path) -> None:
    with DiffusionBase.open(sd_zoo.sd1) as base:
        lora = read_diffusion_lora(sd_zoo.sd1_lora, base)
        write_peft_components(tmp_path / "peft", lora.adapter.modules, base, torch.float32)
    assert detect_format(tmp_path / "peft") == "peft"
    config = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 2
    back = read_diffusion_lora(tmp_path / "peft").adapter.modules
    assert set(back) == set(lora.adapter.modules)
    for name, module in lora.adapter.modules.items():
        assert back[name].kernel == module.kernel
        assert torch.equal(back[name].A, module.A) and torch.equal(back[name].B, module.B)


def test_alpha_defaults_to_the_rank(sd_zoo, tmp_path) -> None:
    state = {k: v for k, v in load_file(str(sd_zoo.sd1_lora)).items() if not k.endswith(".alpha")}
    save_file(state, str(tmp_path / "noalpha.safetensors"))
    with DiffusionBase.open(sd_zoo.sd1) as base:
        modules = read_diffusion_lora(tmp_path / "noalpha.safetensors", base).adapter.modules
    assert all(m.alpha == m.rank and m.scale == 1.0 for m in modules.values())


@pytest.mark.parametrize(
    ("suffix", "what"),
    [
        ("hada_w1_a", "LoHa"),
        ("lokr_w1", "LoKr"),
        ("lora_mid.weight", "lora_mid"),
        ("dora_scale", "DoRA"),
        ("diff", "full weight difference"),
    ],
)
def test_lycoris_types_are_refused_or_dropped(sd_zoo, tmp_path, suffix: str, what: str) -> None:
    state = load_file(str(sd_zoo.sd1_lora))
    victim = "lora_unet_down_blocks_0_attentions_0_proj_out"
    state[f"{victim}.{suffix}"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "mixed.safetensors"))
    with DiffusionBase.open(sd_zoo.sd1) as base:
        with pytest.raises(AdapterError, match=f"{victim}.*{what}.*--drop-unsupported"):
            read_diffusion_lora(tmp_path / "mixed.safetensors", base)
        lora = read_diffusion_lora(tmp_path / "mixed.safetensors", base, drop_unsupported=True)
    assert what in lora.dropped[victim]
    assert "unet.down_blocks.0.attentions.0.proj_out" not in lora.adapter.modules
    assert (
        len(lora.adapter.modules)
        == len(read_diffusion_lora(sd_zoo.sd1_lora, DiffusionBase.open(sd_zoo.sd1)).adapter.modules) - 1
    )


def test_names_of_another_model_are_an_error(sd_zoo) -> None:
    with (
        DiffusionBase.open(sd_zoo.sd1) as base,
        pytest.raises(AdapterError, match="match no module of the source base"),
    ):
        read_diffusion_lora(sd_zoo.sdxl_lora, base)


def test_detect_format(sd_zoo, zoo, tmp_path) -> None:
    assert detect_format(sd_zoo.sd1_lora) == "kohya"
    assert detect_format(zoo.llama_adapter) is None  # a PEFT LLM adapter directory
    folder = tmp_path / "dir"
    folder.mkdir()
    save_file(
        {"unet.x.lora_A.weight": torch.zeros(1, 2), "unet.x.lora_B.weight": torch.zeros(2, 1)},
        str(folder / "pytorch_lora_weights.safetensors"),
    )
    assert detect_format(folder) == "diffusers"
    save_file({"something": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraportError, match="not a kohya"):
        detect_format(tmp_path / "other.safetensors")


def test_a_base_without_unet_is_an_error(tmp_path, zoo) -> None:
    with pytest.raises(LoraportError, match="not a Stable Diffusion base"):
        DiffusionBase.open(zoo.llama)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraportError, match=r"model\.diffusion_model"):
        DiffusionBase.open(tmp_path / "x.safetensors")
