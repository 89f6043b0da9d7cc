"""``identity``: copy the source factors unchanged (baseline; same shapes only)."""

from __future__ import annotations

from .base import MethodContext, MethodResult


def identity(ctx: MethodContext) -> MethodResult:
    """``B_t = B_s``, ``A_t = A_s``.

    Raises:
        ValueError: if the source and target shapes differ.
    """
    if not ctx.same_shape:
        raise ValueError(f"identity needs equal shapes, got {ctx.source_shape} -> {tuple(ctx.target_shape)}")
    return MethodResult(ctx.B, ctx.A)
