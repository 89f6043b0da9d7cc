"""The language-model front: PEFT LoRA adapters of causal LMs, modules paired by role across architectures."""

from __future__ import annotations

from .port import transfer_llm

__all__ = ["transfer_llm"]
