"""Image-model LoRA fusion: kohya / diffusers files of one tiny SD base, fused, written, loaded in diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loraport import FusionError, LoraportError, fuse
from loraport.cli import main
from loraport.diffusion import DiffusionBase, read_diffusion_lora
from loraport.diffusion.formats import write_diffusers
from loraport.diffusion.fuse import fuse_diffusion
from loraport.zoo.tiny_diffusion import make_random_kohya_lora

from .test_diffusion import _lora_deltas, _merged, _noise_prediction, _pipeline


@pytest.fixture(scope="module")
def loras(sd_zoo, tmp_path_factory) -> dict[str, Path]:
    """Two kohya LoRAs of sd1 (conv modules included) and the second one as a diffusers file."""
    root = tmp_path_factory.mktemp("fuse-sd")
    first = sd_zoo.sd1_lora
    second = make_random_kohya_lora(sd_zoo.sd1, root / "second.safetensors", rank=4, alpha=4.0, conv=True, seed=5)
    with DiffusionBase.open(sd_zoo.sd1) as base:
        modules = read_diffusion_lora(second, base).adapter.modules
    diffusers = write_diffusers(root / "second-diffusers.safetensors", modules, {}, {}, torch.float32)
    return {"first": first, "second": second, "diffusers": diffusers, "root": root}


def _modules(path: Path, base: Path) -> dict:
    with DiffusionBase.open(base) as sd:
        return read_diffusion_lora(path, sd).adapter.modules


def _dense(module) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return module.scale * (module.B.double() @ module.A.double())


def test_kohya_pair_fused_by_task_arithmetic_is_the_float64_sum_and_loads_in_diffusers(sd_zoo, loras, tmp_path):
    out = tmp_path / "both.safetensors"
    result = fuse(loras["first"], loras["second"], out, method="task_arithmetic", scaling=0.75, progress=False)
    assert result.output == out and result.report.kind == "adapter"
    keys = load_file(str(out)).keys()
    assert all(k.startswith("lora_") for k in keys)  # written as kohya, the inputs' format
    with safe_open(str(out), framework="pt") as handle:
        conv = [k for k in handle.keys() if k.endswith("lora_down.weight") and handle.get_slice(k).get_shape()[-1] == 3]
    assert conv, "conv (LoCon) modules keep their 3x3 kernel"
    first, second, fused = (_modules(p, sd_zoo.sd1) for p in (loras["first"], loras["second"], out))
    assert set(fused) == set(first) == set(second)
    for name, module in fused.items():
        expected = 0.75 * (_dense(first[name]) + _dense(second[name]))
        torch.testing.assert_close(_dense(module), expected, rtol=1e-5, atol=1e-6)

    pipe = _pipeline(sd_zoo.sd1)
    expected = _noise_prediction(_merged(pipe.unet, fused, "unet"))
    pipe.load_lora_weights(str(out))
    deltas = _lora_deltas(pipe.unet)
    assert set(deltas) == {n.partition(".")[2] for n in fused if n.startswith("unet.")}
    torch.testing.assert_close(_noise_prediction(pipe.unet), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ties", "tsv", "iso_cts", "dare", "average", "rgsp"])
def test_mixed_kohya_and_diffusers_inputs_fuse_with_the_base(sd_zoo, loras, tmp_path, method):
    out = tmp_path / "mixed"
    result = fuse(loras["first"], loras["diffusers"], out, base=sd_zoo.sd1, method=method, progress=False)
    assert (out / "lora.safetensors").is_file() and (out / "loraport_fusion_report.json").is_file()
    assert "read as kohya, diffusers; written as kohya" in " ".join(result.report.notes)
    fused = _modules(out, sd_zoo.sd1)
    # The same fusion from two kohya files (names resolved without a base) gives the same update.
    same = fuse_diffusion([loras["first"], loras["second"]], None, method=method, progress=False)
    by_kohya = {n: _dense(m) for n, m in same.adapter.modules.items()}
    assert len(by_kohya) == len(fused)
    total = sum(float(_dense(m).norm()) for m in fused.values())
    assert total > 0 and all(torch.isfinite(_dense(m)).all() for m in fused.values())


def test_out_format_diffusers_loads_in_diffusers(sd_zoo, loras, tmp_path):
    out = tmp_path / "both-diffusers.safetensors"
    fuse(
        loras["first"], loras["diffusers"], out, base=sd_zoo.sd1, out_format="diffusers", method="ties", progress=False
    )
    assert all(k.startswith(("unet.", "text_encoder.")) for k in load_file(str(out)))
    fused = _modules(out, sd_zoo.sd1)
    pipe = _pipeline(sd_zoo.sd1)
    expected = _noise_prediction(_merged(pipe.unet, fused, "unet"))
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(_noise_prediction(pipe.unet), expected, rtol=1e-4, atol=1e-4)


def test_cli_fuses_image_loras(sd_zoo, loras, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    argv = ["fuse", "--models", str(loras["first"]), str(loras["second"]), "--out", str(out), "--method", "tsv"]
    assert main([*argv, "--rank", "6", "--quiet"]) == 0
    assert "image-model LoRA written to" in capsys.readouterr().out
    assert max(m.rank for m in _modules(out, sd_zoo.sd1).values()) <= 6


def test_bad_image_inputs_are_one_line_errors_and_write_nothing(sd_zoo, zoo, loras, tmp_path, capsys):
    out = tmp_path / "never.safetensors"
    cases = [
        ([loras["first"], loras["diffusers"]], {}, "mixing formats needs --base"),
        ([loras["first"], loras["second"]], {"method": "regmean"}, "language model's activations"),
        ([loras["first"], loras["second"]], {"out_format": "diffusers"}, "needs --base"),
        ([loras["first"], zoo.llama_adapter], {}, "pass only image-model LoRAs"),
        ([loras["first"], sd_zoo.sdxl_lora], {}, "no module in common"),
    ]
    for inputs, kwargs, message in cases:
        with pytest.raises(LoraportError, match=message) as info:
            fuse_diffusion(inputs, out, progress=False, **kwargs)
        assert "\n" not in str(info.value)
        assert not out.exists()
    with pytest.raises(FusionError, match="fuse inputs of one kind"):
        fuse(loras["first"], zoo.llama_adapter, out)
    argv = ["fuse", "--models", str(loras["first"]), str(zoo.llama_adapter), "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one kind" in err
    assert not out.exists()
