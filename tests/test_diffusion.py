"""Porting image-model LoRAs end to end: CLI, diffusers loading, conv layouts, missing blocks, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraport import TransferError, transfer
from loraport.cli import main
from loraport.diffusion import DiffusionBase, read_diffusion_lora
from loraport.subspace import top_k_svd


def _pipeline(base: Path):
    """A diffusers pipeline on ``base``'s UNet and text encoder(s) (no VAE or tokenizer needed to load LoRAs)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = dict(
        vae=None,
        tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(base / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder"),
        scheduler=DDPMScheduler(),
    )
    if (base / "text_encoder_2").is_dir():
        encoder_2 = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")
        return StableDiffusionXLPipeline(**parts, text_encoder_2=encoder_2, tokenizer_2=None)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _noise_prediction(unet, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    config = unet.config
    x = torch.randn(2, config.in_channels, 8, 8, generator=gen)
    states = torch.randn(2, 5, config.cross_attention_dim, generator=gen)
    extra = {}
    if config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=gen),
            "time_ids": torch.randn(2, 6, generator=gen),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), states, **extra).sample


def _merged(module: torch.nn.Module, modules: dict, component: str) -> torch.nn.Module:
    """A copy of ``module`` with the ported updates added densely (float64 reference)."""
    reference = copy.deepcopy(module)
    with torch.no_grad():
        for name, lora in modules.items():
            owner, _, path = name.partition(".")
            if owner != component:
                continue
            if not hasattr(reference, "text_model"):
                path = path.removeprefix("text_model.")
            weight = reference.get_submodule(path).weight
            weight += (lora.scale * (lora.B.double() @ lora.A.double())).reshape(weight.shape).float()
    return reference


def _lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module -> dense update of every LoRA layer PEFT injected into ``model``."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            for adapter in layer.lora_A:
                A = layer.lora_A[adapter].weight.flatten(1).double()
                B = layer.lora_B[adapter].weight.flatten(1).double()
                deltas[name] = layer.scaling[adapter] * (B @ A)
    return deltas


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_cli_port_loads_in_diffusers_and_changes_the_noise_prediction(sd_zoo, tmp_path, capsys, style, fmt) -> None:
    source, target = (sd_zoo.sd1, sd_zoo.sd1_derivative) if style == "sd1" else (sd_zoo.sdxl, sd_zoo.sdxl_derivative)
    lora = sd_zoo.sd1_lora if style == "sd1" else sd_zoo.sdxl_lora
    out = tmp_path / "out"
    argv = ["transfer", "--adapter", str(lora), "--source-base", str(source), "--target-base", str(target)]
    argv += ["--out", str(out), "--out-format", fmt, "--method", "prolora", "--subspace-rank", "8", "--quiet"]
    assert main(argv) == 0
    assert "transferred, 0 skipped" in capsys.readouterr().out
    weights = out / ("pytorch_lora_weights.safetensors" if fmt == "diffusers" else "lora.safetensors")
    keys = load_file(str(weights)).keys()
    assert all(k.startswith(("unet.", "text_encoder")) if fmt == "diffusers" else k.startswith("lora_") for k in keys)
    if fmt == "kohya" and style == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and any("lora_te2_" in k for k in keys)
    with DiffusionBase.open(target) as tgt:
        ported = read_diffusion_lora(out, tgt).adapter.modules

    pipe = _pipeline(target)
    before = _noise_prediction(pipe.unet)
    expected = _noise_prediction(_merged(pipe.unet, ported, "unet"))
    pipe.load_lora_weights(str(out))
    after = _noise_prediction(pipe.unet)
    # Every module of the file was injected with exactly our update: no missing, no unexpected keys.
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if not hasattr(pipe, component) or getattr(pipe, component) is None:
            continue
        deltas = _lora_deltas(getattr(pipe, component))
        ours = {n.partition(".")[2]: m for n, m in ported.items() if n.partition(".")[0] == component}
        if component != "unet" and not hasattr(getattr(pipe, component), "text_model"):
            ours = {n.removeprefix("text_model."): m for n, m in ours.items()}
        assert set(deltas) == set(ours), component
        for name, module in ours.items():
            torch.testing.assert_close(deltas[name], module.scale * (module.B.double() @ module.A.double()))
    assert float((after - before).abs().max()) > 1e-3
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def test_peft_out_format_loads_with_peft(sd_zoo, tmp_path) -> None:
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    out = tmp_path / "out"
    result = transfer(sd_zoo.sd1_lora, sd_zoo.sd1, sd_zoo.sd1_derivative, out, out_format="peft", progress=False)
    unet = UNet2DConditionModel.from_pretrained(sd_zoo.sd1_derivative / "unet")
    expected = _noise_prediction(_merged(unet, result.adapter.modules, "unet"))
    model = PeftModel.from_pretrained(unet, str(out / "unet"))
    assert len(_lora_deltas(model)) == sum(n.startswith("unet.") for n in result.adapter.modules)
    torch.testing.assert_close(_noise_prediction(model), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(TransferError, match="peft writes a directory"):
        transfer(sd_zoo.sd1_lora, sd_zoo.sd1, sd_zoo.sd1_derivative, tmp_path / "x.safetensors", out_format="peft")


def test_prolora_and_identity_on_the_source_base_return_the_adapter(sd_zoo, tmp_path) -> None:
    """Equal bases: every method that keeps the complement returns dW exactly, conv modules included."""
    with DiffusionBase.open(sd_zoo.sd1) as base:
        source = read_diffusion_lora(sd_zoo.sd1_lora, base).adapter.modules
    for method in ("identity", "prolora"):
        out = tmp_path / f"{method}.safetensors"
        transfer(sd_zoo.sd1_lora, sd_zoo.sd1, sd_zoo.sd1, out, method=method, subspace_rank=4, progress=False)
        tensors = load_file(str(out))
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 4, 1, 1)
        with DiffusionBase.open(sd_zoo.sd1) as base:
            ported = read_diffusion_lora(out, base).adapter.modules
        for name, module in source.items():
            torch.testing.assert_close(
                ported[name].delta(torch.float64), module.delta(torch.float64), rtol=1e-5, atol=1e-6
            )
            assert ported[name].kernel == module.kernel


def test_conv_module_matches_the_flattened_reference(sd_zoo, tmp_path) -> None:
    """``project`` on a 3x3 conv: U_t U_t^T dW V_t V_t^T on the (out, in * 9) matrices (SPEC sec. 11)."""
    out = tmp_path / "p.safetensors"
    transfer(
        sd_zoo.sd1_lora,
        sd_zoo.sd1,
        sd_zoo.sd1_derivative,
        out,
        method="project",
        subspace_rank=6,
        svd="exact",
        progress=False,
    )
    name = "unet.down_blocks.1.resnets.0.conv1"
    with DiffusionBase.open(sd_zoo.sd1) as base:
        source = read_diffusion_lora(sd_zoo.sd1_lora, base).adapter.modules[name]
    with DiffusionBase.open(sd_zoo.sd1_derivative) as target:
        ported = read_diffusion_lora(out, target).adapter.modules[name]
        W = target.components["unet"].get("down_blocks.1.resnets.0.conv1.weight").double()
    assert W.shape == (64, 32, 3, 3) and ported.kernel == (3, 3)
    sub = top_k_svd(W.flatten(1), 6, "exact")
    expected = sub.U @ sub.U.T @ source.delta(torch.float64) @ sub.V @ sub.V.T
    torch.testing.assert_close(ported.delta(torch.float64), expected, rtol=1e-4, atol=1e-6)


def test_conv_proj_in_goes_to_a_linear_target(sd_zoo, tmp_path) -> None:
    """SD-1.x ``proj_in`` is a 1x1 conv, SDXL's a linear layer: the target decides the written layout."""
    out = tmp_path / "out"
    transfer(
        sd_zoo.sd1_lora, sd_zoo.sd1, sd_zoo.sd1_linear, out, out_format="diffusers", method="prolora", progress=False
    )
    tensors = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert load_file(str(sd_zoo.sd1_lora))["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 4
    assert tensors["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].ndim == 2
    assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].ndim == 4
    pipe = _pipeline(sd_zoo.sd1_linear)
    before = _noise_prediction(pipe.unet)
    pipe.load_lora_weights(str(out))
    assert float((_noise_prediction(pipe.unet) - before).abs().max()) > 1e-3


def test_blocks_missing_in_the_target_are_listed(sd_zoo, tmp_path) -> None:
    report = tmp_path / "report.json"
    result = transfer(
        sd_zoo.sdxl_lora,
        sd_zoo.sdxl,
        sd_zoo.sdxl_distilled,
        tmp_path / "o.safetensors",
        report_path=report,
        progress=False,
    )
    skipped = [r for r in result.report.records if r.decision == "skipped"]
    assert skipped and all(".transformer_blocks.1." in r.source_module for r in skipped)
    assert {r.reason for r in skipped} == {"target base has no such module"}
    # The deepest level's 6 attentions (2 down, 1 mid, 3 up) lose block 1: its 10 adapted modules each.
    assert len(skipped) == 6 * 10
    notes = json.loads(report.read_text())["notes"]
    block = "unet.mid_block.attentions.0.transformer_blocks.1 (10)"
    assert any("no counterpart in the target" in n and block in n for n in notes)
    assert "skipped x60: target base has no such module" in result.report.summary()
    assert len(result.adapter.modules) == len(result.report.records) - 60


def test_single_file_bases_port_like_folders(sd_zoo, tmp_path) -> None:
    folder = transfer(
        sd_zoo.sdxl_lora,
        sd_zoo.sdxl,
        sd_zoo.sdxl_derivative,
        tmp_path / "a.safetensors",
        method="prolora",
        progress=False,
    )
    single = transfer(
        sd_zoo.sdxl_lora,
        sd_zoo.sdxl_single,
        sd_zoo.sdxl_derivative,
        tmp_path / "b.safetensors",
        method="prolora",
        progress=False,
    )
    assert set(folder.adapter.modules) == set(single.adapter.modules)
    for name, module in folder.adapter.modules.items():
        torch.testing.assert_close(single.adapter.modules[name].delta(), module.delta(), rtol=1e-4, atol=1e-6)
    # and as a target: a single file in, a kohya file with sgm names out
    back = transfer(
        tmp_path / "a.safetensors",
        sd_zoo.sdxl_derivative,
        sd_zoo.sdxl_single,
        tmp_path / "c.safetensors",
        method="identity",
        progress=False,
    )
    assert back.report.totals()["skipped"] == 0
    assert set(load_file(str(tmp_path / "c.safetensors"))) == set(load_file(str(tmp_path / "a.safetensors")))


def test_kohya_metadata_is_kept_and_updated(sd_zoo, tmp_path) -> None:
    from safetensors import safe_open

    out = tmp_path / "o.safetensors"
    transfer(sd_zoo.sd1_lora, sd_zoo.sd1, sd_zoo.sd1_derivative, out, method="identity", progress=False)
    meta = safe_open(str(out), "pt").metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_sd_model_name"] == sd_zoo.sd1_derivative.name
    assert meta["loraport_method"] == "identity" and meta["loraport_target_base"] == str(sd_zoo.sd1_derivative)


def test_errors_are_one_line_and_leave_nothing(sd_zoo, zoo, tmp_path, capsys) -> None:
    out = tmp_path / "out.safetensors"
    base = ["transfer", "--adapter", str(sd_zoo.sd1_lora), "--source-base", str(sd_zoo.sd1)]
    base += ["--target-base", str(sd_zoo.sd1_derivative), "--out", str(out), "--quiet"]
    assert main([*base, "--method", "calibrated", "--calibration", __file__]) == 2
    assert "not for diffusion LoRAs" in capsys.readouterr().err
    assert main([*base, "--layer-map", "0:0"]) == 2
    assert "paired by name" in capsys.readouterr().err
    assert not out.exists()
    out.write_text("x")
    assert main(base) == 2
    assert "already exists" in capsys.readouterr().err
    argv = ["transfer", "--adapter", str(zoo.llama_adapter), "--source-base", str(zoo.llama), "--target-base"]
    assert main([*argv, str(zoo.llama), "--out", str(tmp_path / "llm"), "--out-format", "kohya"]) == 2
    assert "LLM adapters are peft or gguf" in capsys.readouterr().err
    assert (
        main(
            [
                "transfer",
                "--adapter",
                str(sd_zoo.sdxl_lora),
                "--source-base",
                str(sd_zoo.sd1),
                "--target-base",
                str(sd_zoo.sd1),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "match no module of the source base" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_inspect_reads_kohya_files(sd_zoo, capsys) -> None:
    assert main(["inspect", str(sd_zoo.sd1_lora)]) == 0
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in capsys.readouterr().out
    assert main(["inspect", str(sd_zoo.sd1_lora), "--base", str(sd_zoo.sd1), "--subspace-rank", "4", "--json"]) == 0
    rows = {r["module"]: r for r in json.loads(capsys.readouterr().out)}
    conv = rows["unet.down_blocks.0.resnets.0.conv1"]
    assert conv["shape"] == [32, 32 * 9] and conv["k"] == 4 and 0 <= conv["in_base_subspace"] <= 1
