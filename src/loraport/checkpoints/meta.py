"""Build ``transformers`` models without allocating their weights (the readers then assign them one by one)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

# Rows converted at a time when a tensor is read in another type: Gemma-3's 262k x 640 embedding
# is 0.67 GB in float32; read whole and converted to bfloat16 it held 1 GB at once.
BLOCK_BYTES = 64 << 20


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the ``meta`` device, buffers as usual (rotary ``inv_freq`` stays real)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def fill_by_blocks(
    model: torch.nn.Module,
    keys: Sequence[str],
    shape: Callable[[str], tuple[int, ...]],
    read: Callable[[str, tuple[int, int] | None], torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Assign the tensors ``keys`` (read by ``read(key, rows)``) to the parameters of ``model`` of those names, in
    ``dtype``, a block of rows at a time."""
    for key in keys:
        dims = shape(key)
        out = torch.empty(dims, dtype=dtype)
        if len(dims) == 0:
            out.copy_(read(key, None))
        else:
            row_bytes = max(1, out[:1].numel() * 4)
            step = max(1, BLOCK_BYTES // row_bytes)
            for start in range(0, dims[0], step):
                stop = min(dims[0], start + step)
                out[start:stop] = read(key, (start, stop)).to(dtype)
        model.load_state_dict({key: out}, strict=False, assign=True)


__all__ = ["BLOCK_BYTES", "fill_by_blocks", "parameters_on_meta"]
