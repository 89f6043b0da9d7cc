"""A sharded safetensors writer that flushes each shard as soon as it is full.

Shards are named like ``transformers`` does (``model-00001-of-00003.safetensors``) with a
``model.safetensors.index.json``; one shard is still written in the sharded layout so
every output looks the same. Memory use is bounded by one shard.

Example::

    >>> writer = ShardedWriter("/tmp/out", max_shard_bytes=2**30)  # doctest: +SKIP
    >>> writer.add("lm_head.weight", tensor)                          # doctest: +SKIP
    >>> writer.close()                                                # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardedWriter:
    """Collect tensors into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""

    def __init__(self, root: str | os.PathLike[str], max_shard_bytes: int) -> None:
        self.root = Path(root)
        self.max_shard_bytes = int(max_shard_bytes)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        size = _nbytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != size:
            tensor = tensor.clone()  # safetensors refuses views of a larger storage
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.root / f".shard-{len(self._shards) + 1:05d}.safetensors.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> dict[str, str]:
        """Flush, rename the shards to their final names, write the index; returns the weight map."""
        self._flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, keys) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.root / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
