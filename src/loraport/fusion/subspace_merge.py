"""Subspace merging of task matrices: TSV-M, Iso-C and Iso-CTS (SPEC sec. 12).

Pure functions on the task matrices ``D_i: (m, n)`` of one layer (``D_i = W_i - W_0``, or an
adapter's core); each returns the merged task matrix ``D: (m, n)`` and the caller forms
``W_0 + alpha D``. Computed in float32 (float64 for float64 input).

* :func:`tsv` (Task Singular Vectors merge, Gargiulo et al., CVPR 2025): each ``D_i``'s top
  ``k = floor(d / T)`` singular triplets, concatenated ``U = [U_1 .. U_T]``, ``S``,
  ``V = [V_1 .. V_T]``; the concatenated bases are replaced by the nearest matrices with
  orthonormal columns (orthogonal Procrustes, :func:`orthogonalize`); ``D = U_perp diag(S) V_perp^T``.
* :func:`iso_c` (Marczak et al., ICML 2025): ``sum_i D_i = U Sigma V^T`` with its spectrum made
  flat, ``D = mean(Sigma) U V^T`` over the nonzero spectrum.
* :func:`iso_cts`: the top ``k = floor(common_fraction d)`` directions of ``sum_i D_i``
  (the common subspace), then each task's top ``floor((d - k) / T)`` directions of its part
  orthogonal to the common subspace; bases orthogonalised as in TSV; the spectrum made flat
  (the mean of all kept singular values).

``d`` is ``min(m, n)`` unless given: on adapters the methods run on the ``(T r) x (T r)``
cores of :mod:`~loraport.fusion.core_space`, where ``d`` is the core's size (the dimension
of the space the task matrices live in). Singular directions that are numerically zero
(``S_i <= rtol S_0``, see :func:`zero_tolerance`) are never kept: their vectors are arbitrary,
and a flat spectrum would give them the mean singular value.

Example::

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> D1, D2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    >>> iso = iso_c([D1, D2])
    >>> S = torch.linalg.svdvals(iso)
    >>> bool(torch.allclose(S, S.mean().expand(5)))  # flat spectrum
    True
    >>> tsv([D1, D1.clone() * 0]).shape
    torch.Size([6, 5])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..lowrank import DEFAULT_RTOL

DEFAULT_COMMON_FRACTION = 0.8


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def zero_tolerance(dtype: torch.dtype, rtol: float | None = None) -> float:
    """Relative size below which a singular value counts as zero.

    ``rtol`` if given, else ``max(1e-6, 100 eps)`` of ``dtype`` (1e-6 in float64, 1.2e-5 in
    float32): float32 round-off leaves singular values near ``1e-6 S_0`` in the directions a
    projection removed, and a flat spectrum must not lift them to the mean.
    """
    if rtol is not None:
        return rtol
    return max(DEFAULT_RTOL, 100 * torch.finfo(dtype).eps)


def _nonzero(S: torch.Tensor, scale: float, rtol: float) -> int:
    """How many of the descending singular values ``S`` exceed ``rtol * scale``."""
    if S.numel() == 0 or scale <= 0:
        return 0
    return int((rtol * scale < S).sum())


def orthogonalize(X: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns to ``X: (m, c)``, ``c <= m`` (orthogonal Procrustes).

    ``X = P Sigma Q^T`` (thin SVD) gives ``P Q^T`` = ``argmin ||X - Y||_F`` over ``Y^T Y = I``:
    the polar factor of ``X``. Columns that were already orthonormal are unchanged.
    """
    if X.shape[1] == 0:
        return X
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def _check(deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not deltas:
        raise ValueError("need at least one task matrix")
    work = [_work(D) for D in deltas]
    shape = work[0].shape
    if len(shape) != 2 or any(D.shape != shape for D in work):
        raise ValueError(f"task matrices must be 2-D and of one shape, got {[tuple(D.shape) for D in work]}")
    return work


def _triplets(D: torch.Tensor, count: int, rtol: float, scale: float | None = None) -> tuple[torch.Tensor, ...]:
    """The top ``count`` nonzero singular triplets of ``D``: ``U (m, k), S (k,), V (n, k)``."""
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    reference = float(S[0]) if scale is None and S.numel() else (scale or 0.0)
    keep = min(count, _nonzero(S, reference, rtol))
    return U[:, :keep], S[:keep], Vh[:keep].mT


def _assemble(Us: list[torch.Tensor], S: torch.Tensor, Vs: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    U, V = torch.cat(Us, dim=1), torch.cat(Vs, dim=1)
    if U.shape[1] == 0:
        return U.new_zeros(shape)
    return (orthogonalize(U) * S) @ orthogonalize(V).mT


def tsv(deltas: Sequence[torch.Tensor], dim: int | None = None, rtol: float | None = None) -> torch.Tensor:
    """TSV-M: the per-task top singular directions, concatenated and orthogonalised.

    Args:
        deltas: ``T`` task matrices ``D_i: (m, n)``.
        dim: ``d`` for the per-task budget ``floor(d / T)`` (default ``min(m, n)``).
        rtol: zero tolerance (default :func:`zero_tolerance`).

    Returns:
        ``D = U_perp diag(S) V_perp^T: (m, n)``; ``S`` keeps each task's own singular values.
    """
    work = _check(deltas)
    m, n = work[0].shape
    tol = zero_tolerance(work[0].dtype, rtol)
    per_task = max(1, (dim or min(m, n)) // len(work))
    Us, Ss, Vs = [], [], []
    for D in work:
        U, S, V = _triplets(D, per_task, tol)
        Us.append(U)
        Ss.append(S)
        Vs.append(V)
    return _assemble(Us, torch.cat(Ss), Vs, work[0].shape)


def iso_c(deltas: Sequence[torch.Tensor], rtol: float | None = None) -> torch.Tensor:
    """Iso-C: ``sum_i D_i = U Sigma V^T`` -> ``mean(Sigma) U V^T`` over the nonzero spectrum."""
    work = _check(deltas)
    total = torch.stack(work).sum(0)
    tol = zero_tolerance(total.dtype, rtol)
    U, S, V = _triplets(total, min(total.shape), tol)
    if S.numel() == 0:
        return total.new_zeros(total.shape)
    return (S.mean() * U) @ V.mT


def iso_cts(
    deltas: Sequence[torch.Tensor],
    common_fraction: float = DEFAULT_COMMON_FRACTION,
    dim: int | None = None,
    rtol: float | None = None,
) -> torch.Tensor:
    """Iso-CTS: common subspace of ``sum_i D_i`` plus task-specific directions, flat spectrum.

    Args:
        deltas: ``T`` task matrices ``D_i: (m, n)``.
        common_fraction: the common subspace keeps ``k = floor(common_fraction d)`` directions
            of the sum (fewer if its rank is lower); each task adds its top
            ``floor((d - k) / T)`` directions of ``D_i - U_c U_c^T D_i``.
        dim: ``d`` (default ``min(m, n)``).
        rtol: zero tolerance; a task's residual direction counts as zero below ``rtol ||D_i||_2``.

    Returns:
        ``mean(S) U_perp V_perp^T: (m, n)``, ``S`` all kept singular values (common and task-specific).
    """
    if not 0 <= common_fraction <= 1:
        raise ValueError(f"common_fraction must be in [0, 1], got {common_fraction}")
    work = _check(deltas)
    m, n = work[0].shape
    d = dim or min(m, n)
    tol = zero_tolerance(work[0].dtype, rtol)
    total = torch.stack(work).sum(0)
    k = int(common_fraction * d)
    U_c, S_c, V_c = _triplets(total, k, tol)
    per_task = (d - U_c.shape[1]) // len(work)
    Us, Ss, Vs = [U_c], [S_c], [V_c]
    if per_task > 0:
        for D in work:
            residual = D - U_c @ (U_c.mT @ D)
            # Zero relative to the task itself: the residual of a task inside the common space is round-off.
            scale = float(torch.linalg.matrix_norm(D, ord=2)) if D.numel() else 0.0
            U, S, V = _triplets(residual, per_task, tol, scale)
            Us.append(U)
            Ss.append(S)
            Vs.append(V)
    spectrum = torch.cat(Ss)
    if spectrum.numel() == 0:
        return total.new_zeros(total.shape)
    flat = spectrum.mean().expand(spectrum.shape[0])
    return _assemble(Us, flat, Vs, total.shape)


__all__ = ["DEFAULT_COMMON_FRACTION", "iso_c", "iso_cts", "orthogonalize", "tsv", "zero_tolerance"]
