"""loraport: port LoRA adapters between base models without training data.

Public API::

    from loraport import transfer, load_adapter, save_adapter, inspect_adapter
    result = transfer("qwen-lora", "Qwen/Qwen2.5-1.5B", "google/gemma-2-2b", out="gemma-lora")
    print(result.report.summary())
"""

from __future__ import annotations

from .adapters import LoraAdapter, LoraModule, load_adapter, save_adapter
from .api import fuse, transfer
from .batching import BatchOptions, BatchResult, batch
from .checkpoints import Checkpoint
from .errors import AdapterError, CheckpointError, LoraportError, TransferError
from .fusion import FUSION_METHODS, FuseOptions, FusionError, fuse_adapters
from .methods import METHODS
from .port import TransferOptions, TransferResult
from .structure import inspect_adapter
from .subspace import similarity, top_k_svd
from .version import __version__

__all__ = [
    "FUSION_METHODS",
    "METHODS",
    "AdapterError",
    "BatchOptions",
    "BatchResult",
    "Checkpoint",
    "CheckpointError",
    "FuseOptions",
    "FusionError",
    "LoraAdapter",
    "LoraModule",
    "LoraportError",
    "TransferError",
    "TransferOptions",
    "TransferResult",
    "__version__",
    "batch",
    "fuse",
    "fuse_adapters",
    "inspect_adapter",
    "load_adapter",
    "save_adapter",
    "similarity",
    "top_k_svd",
    "transfer",
]
