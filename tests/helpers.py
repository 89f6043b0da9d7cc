"""Checks shared by the end-to-end tests: PEFT loading, dense updates from saved files."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file


def peft_load_and_forward(base: Path, adapter: Path, tokens: int = 10) -> float:
    """Load ``adapter`` on ``base`` with PEFT and return the max logit change it causes.

    Asserts that the adapter's LoRA tensors and the LoRA parameters PEFT created are the
    same set (no missing and no unexpected keys) and that shapes agree.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.eval()
    ids = torch.arange(3, 3 + tokens).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        before = model(ids).logits
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    created = {
        name.replace(".default", ""): tuple(param.shape)
        for name, param in peft_model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }
    saved = {k: tuple(v.shape) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    assert set(created) == set(saved), (
        f"missing: {sorted(set(created) - set(saved))[:4]}, unexpected: {sorted(set(saved) - set(created))[:4]}"
    )
    assert created == saved
    with torch.no_grad():
        after = peft_model(ids).logits
    return float((after - before).abs().max())


def dense_updates(adapter: Path) -> dict[str, torch.Tensor]:
    """module -> scale * B @ A (float64) read straight from a PEFT adapter directory."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    state = load_file(str(adapter / "adapter_model.safetensors"))
    updates = {}
    for key, A in state.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = state[key.replace("lora_A", "lora_B")]
        r = A.shape[0]
        alpha = config["lora_alpha"]
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        updates[module] = scale * (B.double() @ A.double())
    return updates


def base_weight(model_dir: Path, key: str, transposed: bool = False) -> torch.Tensor:
    W = load_file(str(model_dir / "model.safetensors"))[key].double()
    return W.T if transposed else W


def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/NAME.py`` loaded as a module, run on one torch thread (a module fixture's body: ``yield from``)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec and spec.loader, f"cannot load {script}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(before)


def fast_distill(tmp_path: Path, max_new_tokens: int = 4, **extra: object) -> dict[str, object]:
    """``transfer()`` settings of a quick distilled port on the tiny models (a cache under ``tmp_path``)."""
    options: dict[str, object] = {
        "method": "distill",
        "progress": False,
        "distill_cache": str(tmp_path / "cache"),
        "distill_eval_every": 5,
        "distill_max_new_tokens": max_new_tokens,
        "distill_batch_size": 8,
        "distill_heldout": 0.2,
    }
    options.update(extra)
    return options


def demo_source_and_copy(root: Path, drift: float = 0.05) -> tuple[Path, Path]:
    """The demo zoo's trained S copied under ``root``, and D: S with its weights perturbed by ``drift`` and S's
    tokenizer (a derivative sharing the tokenizer)."""
    import shutil

    from loraport.zoo import demo_dir
    from loraport.zoo.tiny import perturb_model

    source = Path(shutil.copytree(demo_dir() / "models" / "S", root / "S"))
    copy = perturb_model(source, root / "D", drift)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, copy / name)
    return source, copy
