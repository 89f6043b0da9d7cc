"""Write small ``transformers`` models to GGUF, for the tests of the GGUF reader.

A minimal subset of llama.cpp's ``convert_hf_to_gguf.py`` for the families loraport maps
(llama / mistral, qwen2, qwen3, gemma, gemma2, gemma3 text, phi3), written with ``gguf``'s
:class:`~gguf.GGUFWriter`, its tensor-name tables and its quantizers: the metadata keys
``transformers`` reads back, the llama q/k row permutation (llama.cpp stores rotary halves
interleaved), Gemma's ``1 + w`` norm weights, and a byte-level BPE tokenizer when the
model directory has one. Not a general converter: use llama.cpp's for real models.

Example::

    >>> write_gguf("tiny-llama", "tiny-llama/model-q8.gguf", "Q8_0")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

# model_type -> gguf architecture name
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",  # fused qkv_proj / gate_up_proj, stored fused as they are
}
_PERMUTED = {"llama"}  # architectures whose q/k rows llama.cpp permutes
_NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: each head's two rotary halves interleaved (the inverse of transformers')."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _metadata(writer: Any, arch: str, config: dict[str, Any], name: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config["vocab_size"])
    if arch in ("llama", "phi3"):
        writer.add_rope_dimension_count(head_dim)
    if isinstance(config.get("pad_token_id"), int):  # else transformers' default (phi3: 32000) may exceed the vocab
        writer.add_pad_token_id(config["pad_token_id"])
    if arch.startswith("gemma") or arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3") and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.get("attn_logit_softcapping") or 50.0)
        writer.add_final_logit_softcapping(config.get("final_logit_softcapping") or 30.0)


def _tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE from ``tokenizer.json`` (as llama.cpp's ``gpt2`` tokenizer model); nothing if absent."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: only byte-level BPE tokenizers are written to GGUF here")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    special = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
    for token, index in vocab.items():
        if index < vocab_size:
            tokens[index] = token
            types[index] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for field, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
        token = tok_config.get(field)
        if isinstance(token, dict):
            token = token.get("content")
        if token in vocab:
            add(vocab[token])


def write_gguf(
    model_dir: str | os.PathLike[str], path: str | os.PathLike[str], qtype: str = "F32", name: str = "tiny"
) -> Path:
    """Write the model saved in ``model_dir`` (``config.json`` + safetensors) as a GGUF file.

    Args:
        model_dir: a ``save_pretrained`` directory of a llama / mistral / qwen2 / qwen3 / gemma family / phi3 model.
        path: the ``.gguf`` file to write.
        qtype: the ggml type of the matrices: ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ... (any type
            ``gguf`` quantizes; rows must be a multiple of its block size). Vectors stay F32.
        name: ``general.name``.
    """
    import gguf
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config["model_type"]
    if model_type not in ARCHITECTURES:
        raise ValueError(f"write_gguf: model_type {model_type!r} is not one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    arch_enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    quant = gguf.GGMLQuantizationType[qtype]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])

    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, arch, config, name)
    _tokenizer(writer, model_dir, config["vocab_size"])
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings", False):
            continue
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise ValueError(f"write_gguf: no GGUF name for {hf_name}")
        gguf_name = f"{gguf_stem}.{suffix}"
        weights = tensor.float().numpy()
        if arch in _PERMUTED and gguf_stem.endswith(("attn_q", "attn_k")):
            weights = _permute(weights, heads if gguf_stem.endswith("attn_q") else kv_heads)
        if arch in _NORM_PLUS_ONE and gguf_name.endswith("norm.weight"):
            weights = weights + 1.0
        if weights.ndim < 2 or quant == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(weights, dtype=np.float32))
        elif quant == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, weights.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(weights, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
