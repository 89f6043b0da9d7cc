"""Shared fixtures: tiny random transformers models and PEFT adapters, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a loaded machine OpenMP spin-waiting makes
# two threads tens of times slower than one.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own subspace cache, so no test sees another's entries."""
    monkeypatch.setenv("LORAPORT_CACHE", str(tmp_path_factory.mktemp("subspace-cache")))


@pytest.fixture(autouse=True)
def _float32_distillation(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--distill-precision auto`` is bfloat16 on CPUs with bfloat16 instructions: the tests
    see float32 on every machine (tests/test_distill.py checks the rule itself)."""
    monkeypatch.setattr("loraport.distill.train.cpu_has_native_bf16", lambda: False)


class Zoo:
    """Lazily built tiny models and adapters under one session directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def _once(self, name: str, build) -> Path:  # type: ignore[no-untyped-def]
        if name not in self._built:
            path = self.root / name
            build(path)
            self._built[name] = path
        return self._built[name]

    def model(self, name: str, model_type: str, seed: int = 0, **config: object) -> Path:
        from loraport.zoo.tiny import make_tiny_model

        return self._once(name, lambda p: make_tiny_model(model_type, p, seed=seed, **config))

    def perturbed(self, name: str, source: Path, drift: float, seed: int = 1) -> Path:
        from loraport.zoo.tiny import perturb_model

        return self._once(name, lambda p: perturb_model(source, p, drift, seed))

    def adapter(self, name: str, base: Path, r: int = 8, seed: int = 0, **lora: object) -> Path:
        from loraport.zoo.tiny import make_random_adapter

        return self._once(name, lambda p: make_random_adapter(base, p, r=r, seed=seed, **lora))

    # The standard pairs of the end-to-end tests.
    @property
    def llama(self) -> Path:
        return self.model("llama", "llama", seed=0, layers=3)

    @property
    def llama_derivative(self) -> Path:
        return self.perturbed("llama-d", self.llama, 0.1)

    @property
    def llama_adapter(self) -> Path:
        return self.adapter("llama-lora", self.llama, r=8)

    @property
    def qwen2(self) -> Path:
        return self.model("qwen2", "qwen2", seed=0, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128)

    @property
    def qwen2_adapter(self) -> Path:
        return self.adapter("qwen2-lora", self.qwen2, r=16)

    @property
    def gemma2(self) -> Path:
        return self.model(
            "gemma2", "gemma2", seed=1, hidden=96, layers=3, heads=4, kv_heads=1, intermediate=160, head_dim=24
        )

    @property
    def phi3(self) -> Path:
        return self.model("phi3", "phi3", seed=2, layers=3)

    @property
    def phi3_adapter(self) -> Path:
        return self.adapter("phi3-lora", self.phi3, r=8)

    @property
    def gpt2(self) -> Path:
        return self.model("gpt2", "gpt2", seed=3, layers=2)

    @property
    def gpt2_adapter(self) -> Path:
        return self.adapter("gpt2-lora", self.gpt2, r=8)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def sd_zoo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Tiny Stable Diffusion bases and kohya LoRAs (see tests/diffusion_zoo.py)."""
    from .diffusion_zoo import SDZoo

    return SDZoo(tmp_path_factory.mktemp("sd-zoo"))
