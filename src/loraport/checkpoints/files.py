"""Weight files read one tensor at a time: safetensors (positioned reads) and pickle ``.bin`` (``weights_only``)."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch

from ..errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20


def read_bytes(fd: int, offset: int, length: int) -> torch.Tensor:
    """``length`` bytes at ``offset`` of an open file, by positioned reads into a fresh buffer.

    A memory map keeps every page it touched resident and counted in the process's RSS, so
    reading a 5 GB model one tensor at a time through a map still ends at 5 GB RSS. Positioned
    reads keep peak memory at about one tensor, and are safe from several threads.
    """
    buffer = torch.empty(length, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    done = 0
    while done < length:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got
    return buffer


class SafetensorsFile:
    """A safetensors file read with positioned reads (:func:`read_bytes`), not a memory map.

    The header is validated against the file size, so corrupt or truncated files fail on open.
    """

    def __init__(self, path: Path, stack: ExitStack) -> None:
        self.path = path
        try:
            handle = stack.enter_context(open(path, "rb"))  # noqa: SIM115 - closed by the stack
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(handle.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc
        self._fd = handle.fileno()
        base = 8 + header_len
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: corrupt safetensors header entry {key!r} ({exc})") from exc
            count = 1
            for dim in shape:
                count *= dim
            if end - begin != count * dtype.itemsize or begin < 0 or base + end > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (tensor {key!r} spans bytes "
                    f"{base + begin}-{base + end} of a {size}-byte file)"
                )
            self._entries[key] = (dtype, shape, base + begin, end - begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get_tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read a tensor, or only rows ``[start, stop)`` of a matrix (contiguous bytes)."""
        dtype, shape, offset, length = self._entries[key]
        if rows is not None and len(shape) >= 1:
            row_bytes = length // shape[0] if shape[0] else 0
            offset, length = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        return read_bytes(self._fd, offset, length).view(dtype).reshape(shape)


class BinFile:
    """A pickle checkpoint loaded with ``weights_only=True`` (memory-mapped when possible)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # Legacy (non-zip) pickle files cannot be memory-mapped.
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load with weights_only=True ({exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors")
        self._state: dict[str, torch.Tensor] = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._state[key]
