"""Tiny random ``transformers`` models and PEFT adapters, built on the fly.

Used by the tests and the quick demo: real model classes, real ``save_pretrained``
files, real PEFT adapters, a few hundred kilobytes each.

Example::

    >>> path = make_tiny_model("llama", "/tmp/tiny-llama")            # doctest: +SKIP
    >>> make_random_adapter(path, "/tmp/tiny-lora", r=8)                # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def tiny_config(
    model_type: str,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    head_dim: int | None = None,
    **extra: Any,
) -> Any:
    """A ``transformers`` config for a tiny model of ``model_type``."""
    from transformers import AutoConfig, GPT2Config

    if model_type == "gpt2":
        return GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=intermediate,
            vocab_size=vocab,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if head_dim is not None or model_type in ("gemma", "gemma2", "gemma3_text", "qwen3"):
        kwargs["head_dim"] = head_dim or hidden // heads
    kwargs.update(extra)
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_model(
    model_type: str, path: str | os.PathLike[str], seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any
) -> Path:
    """Build a randomly initialised causal LM and ``save_pretrained`` it to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **config))
    model.to(dtype)
    model.save_pretrained(str(path))
    return Path(path)


def perturb_model(source: str | os.PathLike[str], path: str | os.PathLike[str], drift: float, seed: int = 1) -> Path:
    """Copy a saved model with every matrix moved by ``drift`` relative Frobenius norm.

    A quick stand-in for a fine-tuned derivative: ``W + drift * ||W|| * G / ||G||`` with
    a Gaussian ``G`` of low effective rank, so top subspaces rotate but do not scramble.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim != 2:
                continue
            m, n = param.shape
            r = max(1, min(m, n) // 4)
            G = torch.randn(m, r, generator=generator) @ torch.randn(r, n, generator=generator)
            param.add_(G * (drift * param.norm() / G.norm()))
    model.save_pretrained(str(path))
    return Path(path)


def make_random_adapter(
    base: str | os.PathLike[str],
    path: str | os.PathLike[str],
    r: int = 8,
    alpha: float = 16,
    target_modules: list[str] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **lora: Any,
) -> Path:
    """Attach a PEFT LoRA with random (non-zero) A and B to ``base`` and save it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    model_type = model.config.model_type
    targets = target_modules or TARGETS.get(model_type, SEVEN)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=model_type == "gpt2", **lora)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    peft_model.to(dtype)
    peft_model.save_pretrained(str(path))
    return Path(path)


def make_bpe_tokenizer(path: str | os.PathLike[str], texts: list[str], vocab_size: int = 320) -> Path:
    """Train a small byte-level BPE tokenizer on ``texts`` and save it (``tokenizer.json`` + config) under ``path``.

    Special tokens ``<|endoftext|>`` (BOS and EOS) and ``<pad>``; no BOS added on encode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(str(path))
    return Path(path)
