"""Shared types of the transfer methods and the dimension adaptation they use.

A method maps the source update ``dW_s = scale * B_s @ A_s`` to factors of the target
update; the scale is carried by the caller, so methods work on ``(B_s, A_s)`` only. All
methods are pure functions of tensors: no I/O, no globals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..subspace import Subspace, orthonormalize


@dataclass
class MethodContext:
    """Inputs of a transfer method for one module.

    Attributes:
        B: ``(m_s, r)`` source up-projection.
        A: ``(r, n_s)`` source down-projection.
        target_shape: ``(m_t, n_t)`` of the target weight (out x in).
        source: top-k subspace of the source base weight (``None`` if the method needs none).
        target: top-k subspace of the target base weight (``None`` if the method needs none).
    """

    B: torch.Tensor
    A: torch.Tensor
    target_shape: tuple[int, int]
    source: Subspace | None = None
    target: Subspace | None = None
    # adapt_dimensions' result, kept: the report's similarity and the method both need it.
    adapted: Adapted | None = field(default=None, repr=False, compare=False)

    @property
    def source_shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def same_shape(self) -> bool:
        return self.source_shape == tuple(self.target_shape)


@dataclass
class MethodResult:
    """Factors of the transferred update (before re-factorisation).

    Attributes:
        B: ``(m_t, r')``; A: ``(r', n_t)``; ``dW_t = scale * B @ A``.
        note: a remark for the report (e.g. how dimensions were adapted).
    """

    B: torch.Tensor
    A: torch.Tensor
    note: str = ""


@dataclass(frozen=True)
class MethodInfo:
    """A registered method and what it needs from the base models.

    Attributes:
        needs_source / needs_target: whether the method reads that base's subspace
            (for modules whose shapes match; different shapes always need both, for the
            importance-based dimension adaptation).
        same_shape_only: the method cannot change dimensions (``identity``).
    """

    name: str
    fn: Callable[[MethodContext], MethodResult]
    needs_source: bool
    needs_target: bool
    same_shape_only: bool = False
    summary: str = ""


# -- dimension adaptation (SPEC sec. 4, procrustes; shared by project/procrustes/prolora) --


def importance_map(source_norms: torch.Tensor, target_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair source and target coordinates by importance rank.

    The i-th most important source coordinate (largest base row/column norm) goes to the
    i-th most important target coordinate, for ``i < min(d_s, d_t)``. With ``d_s > d_t`` this
    keeps the top ``d_t`` source coordinates (top-k selection); with ``d_s < d_t`` the least
    important target coordinates receive nothing (zero padding). Equal sizes map each
    coordinate to itself: coordinates of the same model family already correspond.

    Returns:
        ``(source_index, target_index)``, two long tensors of length ``min(d_s, d_t)``.
    """
    d_s, d_t = int(source_norms.numel()), int(target_norms.numel())
    if d_s == d_t:
        idx = torch.arange(d_s, device=source_norms.device)
        return idx, idx
    d = min(d_s, d_t)
    source_index = torch.argsort(source_norms, descending=True, stable=True)[:d]
    target_index = torch.argsort(target_norms, descending=True, stable=True)[:d].to(source_norms.device)
    return source_index, target_index


def scatter_rows(X: torch.Tensor, source_index: torch.Tensor, target_index: torch.Tensor, rows: int) -> torch.Tensor:
    """``X``'s rows ``source_index`` moved to rows ``target_index`` of a zero ``(rows, X.shape[1])`` matrix."""
    out = X.new_zeros((rows, X.shape[1]))
    out[target_index] = X[source_index]
    return out


@dataclass
class Adapted:
    """The source update and source subspace expressed in target coordinates."""

    B: torch.Tensor  # (m_t, r)
    A: torch.Tensor  # (r, n_t)
    U: torch.Tensor | None  # (m_t, k) orthonormal, or None without a source subspace
    V: torch.Tensor | None  # (n_t, k)
    note: str = ""


def adapt_dimensions(ctx: MethodContext) -> Adapted:
    """Map the source update (and source subspace) into the target's coordinates.

    Same shapes: returned unchanged. Different shapes: rows of ``B_s`` / ``U_s`` and
    columns of ``A_s`` / rows of ``V_s`` are moved by :func:`importance_map` of the base
    weights' row and column norms (needs both subspaces' norms); the moved ``U_s, V_s`` are
    re-orthonormalised, since dropping coordinates breaks orthonormality. The LoRA rank is kept.
    """
    if ctx.adapted is not None:
        return ctx.adapted
    ctx.adapted = _adapt_dimensions(ctx)
    return ctx.adapted


def _adapt_dimensions(ctx: MethodContext) -> Adapted:
    source = ctx.source
    if ctx.same_shape:
        return Adapted(ctx.B, ctx.A, source.U if source else None, source.V if source else None)
    if source is None or ctx.target is None:
        raise ValueError("dimension adaptation needs both base subspaces (for row/column norms)")
    m_t, n_t = ctx.target_shape
    out_s, out_t = importance_map(source.row_norms, ctx.target.row_norms)
    in_s, in_t = importance_map(source.col_norms, ctx.target.col_norms)
    B = scatter_rows(ctx.B, out_s, out_t, m_t)
    A = scatter_rows(ctx.A.mT, in_s, in_t, n_t).mT
    U = orthonormalize(scatter_rows(source.U, out_s, out_t, m_t))
    V = orthonormalize(scatter_rows(source.V, in_s, in_t, n_t))
    m_s, n_s = ctx.source_shape
    note = f"dims adapted by importance: out {m_s}->{m_t}, in {n_s}->{n_t}"
    return Adapted(B, A, U, V, note)
