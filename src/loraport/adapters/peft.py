"""PEFT LoRA adapters: the reader and writer of ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT stores the factors in ``torch.nn.Linear`` layout (``A: (r, in)``, ``B: (out, r)``) even
for GPT-2 ``Conv1D`` layers (``fan_in_fan_out=True`` only transposes the *base* weight), so no
transpose is needed here.

Example::

    >>> adapter = read_peft_adapter("runs/qwen-lora")       # doctest: +SKIP
    >>> m = adapter.modules["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    >>> (m.B.shape, m.A.shape, m.scale)                      # doctest: +SKIP
    (torch.Size([1536, 16]), torch.Size([16, 1536]), 2.0)
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AdapterError
from .model import LoraAdapter, LoraModule

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` lookup (same matching rule as PEFT)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _check_config(config: Any, path: Path) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type} is not supported (only LORA adapters can be ported)")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters (use_dora=true) are not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{path}: adapters that train biases (bias={config.get('bias')!r}) are not supported")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if name == "lora_alpha" and value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{path}: {name} must be a positive number, got {value!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        value = config.get(name) or {}
        if not isinstance(value, dict):
            raise AdapterError(f"{path}: {name} must be an object, got {type(value).__name__}")
    return config


def _why_unsupported(key: str) -> str:
    if "lora_embedding" in key:
        return "LoRA on an embedding"
    if "modules_to_save" in key or ".lora_" not in key:
        return "modules_to_save copy"
    return "unknown tensor"


def read_peft_adapter(path: str | os.PathLike[str], drop_unsupported: bool = False) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (:func:`loraport.adapters.load_adapter` reads every format).

    Args:
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``
            (or ``adapter_model.bin``, loaded with ``weights_only=True``).
        drop_unsupported: skip parts we cannot port (``modules_to_save`` copies, LoRA on
            embeddings) instead of raising; they are listed in :attr:`LoraAdapter.dropped`.

    Raises:
        AdapterError: missing or malformed files, unsupported adapter types (DoRA, LoHa,
            IA3, trained biases), inconsistent ranks, non-finite values.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{root}: adapter directory not found")
    config_path = root / CONFIG_NAME
    if not config_path.exists():
        raise AdapterError(f"{config_path}: missing (not a PEFT adapter directory)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc})") from exc
    config = _check_config(config, config_path)

    weights_path = root / WEIGHTS_NAME
    if weights_path.exists():
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{weights_path}: corrupt or truncated safetensors file ({exc})") from exc
    elif (root / WEIGHTS_NAME_BIN).exists():
        weights_path = root / WEIGHTS_NAME_BIN
        try:
            state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"{weights_path}: cannot load with weights_only=True ({exc})") from exc
        if not isinstance(state, dict):
            raise AdapterError(f"{weights_path}: expected a state dict")
    else:
        raise AdapterError(f"{root}: missing {WEIGHTS_NAME} (or {WEIGHTS_NAME_BIN})")

    dropped: dict[str, str] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY_RE.match(key)
        if match is not None:
            factors.setdefault(match["module"], {})[match["which"]] = tensor
        elif "lora_magnitude_vector" in key:
            raise AdapterError(f"{weights_path}: {key}: DoRA adapters are not supported")
        else:
            dropped[key] = _why_unsupported(key)
    if dropped and not drop_unsupported:
        first = next(iter(dropped))
        raise AdapterError(
            f"{weights_path}: {len(dropped)} tensor(s) are not LoRA factors of linear layers "
            f"(first: {first}, {dropped[first]}); pass drop_unsupported=True (--drop-unsupported) to port the rest"
        )
    for name in config.get("modules_to_save") or []:
        if not drop_unsupported:
            raise AdapterError(
                f"{config_path}: modules_to_save={config['modules_to_save']!r} holds full copies of source "
                "modules that cannot be ported; pass --drop-unsupported to port the LoRA part only"
            )
        dropped.setdefault(f"modules_to_save:{name}", "modules_to_save copy")
    if not factors:
        raise AdapterError(f"{weights_path}: no LoRA factors found (expected base_model.model.<module>.lora_A.weight)")

    use_rslora = bool(config.get("use_rslora", False))
    r_default = int(config["r"])
    alpha_default = float(config.get("lora_alpha") or r_default)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    dtypes: Counter[torch.dtype] = Counter()
    for name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise AdapterError(f"{weights_path}: module {name} has no {missing}.weight")
        A, B = pair["A"], pair["B"]
        alpha = float(pattern_value(alpha_pattern, name, alpha_default))
        try:
            module = LoraModule.from_stored(name, A, B, alpha, use_rslora)
        except ValueError as exc:
            raise AdapterError(f"{weights_path}: module {name}: {exc}") from None
        expected_rank = int(pattern_value(rank_pattern, name, r_default))
        if A.shape[0] != expected_rank:
            raise AdapterError(
                f"{weights_path}: module {name}: factors have rank {A.shape[0]} but the config says r={expected_rank}"
            )
        for which, tensor in (("lora_A", A), ("lora_B", B)):
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{weights_path}: module {name}: {which} contains NaN or Inf")
        dtypes[A.dtype] += 1
        modules[name] = module
    dtype = dtypes.most_common(1)[0][0]
    return LoraAdapter(modules=modules, config=copy.deepcopy(config), dtype=dtype, path=root, dropped=dropped)


# Fields of the source config that describe *where* the adapter sits in the source model;
# they are reset when the adapter is written for another base.
_RESET_FIELDS = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "modules_to_save": None,
    "exclude_modules": None,
    "auto_mapping": None,
    "revision": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def adapter_config_for(
    adapter: LoraAdapter,
    base_model_name_or_path: str | None,
    target_modules: list[str] | str,
    fan_in_fan_out: bool = False,
) -> dict[str, Any]:
    """Build ``adapter_config.json`` for ``adapter`` (ranks and alphas from its modules).

    The most common rank and alpha become ``r`` / ``lora_alpha``; modules that differ get
    entries in ``rank_pattern`` / ``alpha_pattern`` keyed by their full module path.
    """
    config = copy.deepcopy(adapter.config) if adapter.config else {}
    config.setdefault("peft_type", "LORA")
    config.update(_RESET_FIELDS)
    ranks = Counter(m.rank for m in adapter.modules.values())
    r = ranks.most_common(1)[0][0] if ranks else int(config.get("r", 8))
    alphas = Counter(m.alpha for m in adapter.modules.values() if m.rank == r)
    alpha = alphas.most_common(1)[0][0] if alphas else float(config.get("lora_alpha", r))
    config["r"] = int(r)
    config["lora_alpha"] = int(alpha) if float(alpha).is_integer() else float(alpha)
    config["rank_pattern"] = {n: m.rank for n, m in adapter.modules.items() if m.rank != r}
    config["alpha_pattern"] = {
        n: (int(m.alpha) if float(m.alpha).is_integer() else m.alpha)
        for n, m in adapter.modules.items()
        if m.alpha != alpha
    }
    config["use_rslora"] = adapter.use_rslora
    config["base_model_name_or_path"] = base_model_name_or_path
    config["target_modules"] = target_modules
    config["fan_in_fan_out"] = fan_in_fan_out
    config["bias"] = "none"
    config["inference_mode"] = True
    return config


def save_adapter(
    adapter: LoraAdapter,
    path: str | os.PathLike[str],
    config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT adapter directory (``adapter_config.json`` + safetensors).

    Writes into ``path`` (created if needed). For atomic replacement of an existing
    directory use :func:`loraport.io.atomic_directory`.

    Args:
        config: the ``adapter_config.json`` content; default: :func:`adapter_config_for`
            with the adapter's own config and module leaf names.
        dtype: storage dtype; default: ``adapter.dtype``.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if config is None:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in adapter.modules})
        config = adapter_config_for(
            adapter,
            adapter.config.get("base_model_name_or_path"),
            leaves,
            bool(adapter.config.get("fan_in_fan_out", False)),
        )
    dtype = dtype or adapter.dtype
    state: dict[str, torch.Tensor] = {}
    for name, module in adapter.modules.items():
        A, B = module.stored_factors()
        state[f"base_model.model.{name}.lora_A.weight"] = A.detach().to("cpu", dtype).contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = B.detach().to("cpu", dtype).contiguous()
    save_file(state, str(root / WEIGHTS_NAME), metadata={"format": "pt"})
    (root / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return root


def attach_adapter(model: Any, adapter: LoraAdapter) -> Any:
    """``model`` (a ``transformers`` model of the adapter's base) with ``adapter`` attached by PEFT.

    The adapter can then be switched off (``with model.disable_adapter(): ...``) to see the base.
    """
    import tempfile
    import warnings

    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="loraport-adapter-") as tmp:
        save_adapter(adapter, tmp)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, tmp)


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_NAME_BIN",
    "adapter_config_for",
    "attach_adapter",
    "pattern_value",
    "read_peft_adapter",
    "save_adapter",
]
