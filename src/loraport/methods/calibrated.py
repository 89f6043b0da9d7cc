"""``calibrated``: match the adapter's contribution on real activations (ridge regression).

The math of calibrated transfer, as pure functions of tensors; the streaming of the
calibration text through both models lives in :mod:`loraport.calibrate`.

For one module, with ``X_t`` the student's inputs (target base + the adapters already
ported upstream) and ``X_s`` the teacher's (source base + adapter), features x tokens::

    min_dW ||dW X_t - Y||_F^2 + lam' ||dW - dW_0||_F^2,    lam' = lam * mean(diag(X_t X_t^T))

where ``Y = dW_s X_s`` (the adapter's contribution in the teacher) and ``dW_0`` the start
point (the source update for equal shapes, another method's output otherwise). Closed form::

    dW* = (Y X_t^T + lam' dW_0) H^-1,    H = X_t X_t^T + lam' I

Everything is in factors: with ``P_s = A_s X_s`` (the LoRA's ``r``-dim code of each token),
``Y X_t^T = s B_s Z`` with the *cross moment* ``Z = P_s X_t^T`` (``r x n_t``), so::

    dW* = s [B_s, lam' B_0] [Z; A_0] H^-1           (rank <= r_s + r_0)

with ``dW_0 = s B_0 A_0``. Storing ``Z`` instead of ``G_st = X_s X_t^T`` costs ``r n``
instead of ``n_s n_t`` and works for different input widths ``n_s != n_t``.

Rank reduction to ``r``: the objective equals ``||(dW - dW*) H^{1/2}||_F^2`` plus a
constant, so the best rank-``r`` solution (reduced-rank ridge regression) keeps the top-``r``
left singular directions ``P`` of ``dW* H^{1/2}`` and returns ``P P^T dW*``; plain
truncation (``"svd"``) keeps the top-``r`` of ``dW*`` itself. ``dW* H dW*^T`` needs no square
root: ``A' H A'^T = A' [Z; A_0]^T``.

Every function takes and returns factors scaled like the source (``dW = s B A``, ``s`` carried
by the caller). Example::

    >>> import torch
    >>> n, m, r, T = 12, 10, 3, 200
    >>> B, A = torch.randn(m, r, dtype=torch.float64), torch.randn(r, n, dtype=torch.float64)
    >>> X = torch.randn(n, T, dtype=torch.float64)
    >>> stats = moments(A, X, X)  # same inputs on both sides
    >>> f = calibrated_update(B, A, B, A, stats, lam=1.0, rank=r)
    >>> torch.allclose(f.B @ f.A, B @ A)
    True
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..lowrank import balanced_factors

TRUNCATIONS = ("rrr", "svd")


@dataclass
class Moments:
    """Calibration statistics of one module, summed over tokens (float64; the Gram may be float32).

    Attributes:
        gram: ``(n_t, n_t)`` ``X_t X_t^T``, the student's input Gram matrix (the streaming code
            stores it in float32: it is the largest moment, ``n^2``, and one per fold).
        cross: ``(r_s, n_t)`` ``Z = (A_s X_s) X_t^T``, the teacher's LoRA code against the student's inputs.
        code_gram: ``(r_s, r_s)`` ``(A_s X_s)(A_s X_s)^T`` (for the fit error).
        tokens: how many tokens were summed.
        target_cross: ``(m, n_t)`` ``Y_extra X_t^T`` for an extra, dense regression target
            (output matching, see :func:`calibrated_update`); ``None`` for the plain method.
        target_energy / target_code: ``||Y_extra||_F^2`` and ``(A_s X_s) Y_extra^T``
            ``(r_s, m)``, for the fit error with the extra target.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    code_gram: torch.Tensor
    tokens: int
    target_cross: torch.Tensor | None = None
    target_energy: float = 0.0
    target_code: torch.Tensor | None = None

    def __add__(self, other: Moments) -> Moments:
        def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None or b is None else a + b

        return Moments(
            self.gram + other.gram,
            self.cross + other.cross,
            self.code_gram + other.code_gram,
            self.tokens + other.tokens,
            add(self.target_cross, other.target_cross),
            self.target_energy + other.target_energy,
            add(self.target_code, other.target_code),
        )


def moments(A_s: torch.Tensor, X_s: torch.Tensor, X_t: torch.Tensor, extra: torch.Tensor | None = None) -> Moments:
    """The statistics of :class:`Moments` from token matrices (``X_s: (n_s, T)``, ``X_t: (n_t, T)``).

    ``extra``: ``(m, T)`` an additional regression target (output matching), or ``None``.
    The streaming code accumulates the same sums chunk by chunk.
    """
    X_s, X_t, A_s = X_s.double(), X_t.double(), A_s.double()
    code = A_s @ X_s
    result = Moments(X_t @ X_t.mT, code @ X_t.mT, code @ code.mT, int(X_t.shape[1]))
    if extra is not None:
        extra = extra.double()
        result.target_cross = extra @ X_t.mT
        result.target_energy = float((extra * extra).sum())
        result.target_code = code @ extra.mT
    return result


def ridge_lambda(gram: torch.Tensor, lam: float) -> float:
    """``lam' = lam * mean(diag(X_t X_t^T))``: ``lam`` in units of the mean input energy per feature."""
    return float(lam) * float(torch.diagonal(gram).mean())


@dataclass
class CalibratedFactors:
    """Result of :func:`calibrated_update`: ``dW_t = s B A`` (``B: (m, r')``, ``A: (r', n_t)``, ``r' <= rank``).

    ``lam_prime`` is the absolute ridge weight used; ``dropped_energy`` the fraction of
    ``||dW* H^{1/2}||_F^2`` (``rrr``) or ``||dW*||_F^2`` (``svd``) lost to rank truncation.
    """

    B: torch.Tensor
    A: torch.Tensor
    lam_prime: float
    dropped_energy: float = 0.0


def _cholesky(gram: torch.Tensor, lam_prime: float) -> torch.Tensor:
    """Lower Cholesky factor of ``gram + lam' I``, computed in one ``n x n`` buffer (n = 9216: 680 MB)."""
    H = gram.to(torch.float64, copy=True)  # the Gram may be stored in float32
    H.diagonal().add_(lam_prime)
    info = torch.empty((), dtype=torch.int32, device=gram.device)
    L, info = torch.linalg.cholesky_ex(H, out=(H, info))
    if int(info) != 0:
        # Only when lam' is ~0 and the inputs are rank deficient: add a tiny jitter.
        H.copy_(gram)
        H.diagonal().add_(lam_prime + 1e-10 * float(torch.diagonal(gram).mean().clamp(min=1e-30)))
        L = torch.linalg.cholesky(H, out=H)
    return L


def calibrated_update(
    B_s: torch.Tensor,
    A_s: torch.Tensor,
    B_0: torch.Tensor,
    A_0: torch.Tensor,
    stats: Moments,
    lam: float,
    rank: int,
    truncation: str = "rrr",
    *,
    scale: float = 1.0,
    extra_weight: float = 0.0,
    chol: torch.Tensor | None = None,
    lam_prime: float | None = None,
) -> CalibratedFactors:
    """Ridge regression of the adapter's contribution, reduced to rank ``<= rank``.

    Args:
        B_s: ``(m, r_s)``, A_s: ``(r_s, n_s)`` source factors (``dW_s = s B_s A_s``).
        B_0: ``(m, r_0)``, A_0: ``(r_0, n_t)`` start point (``dW_0 = s B_0 A_0``); ``r_0`` may be 0.
        stats: the module's :class:`Moments` (``cross`` was built with this ``A_s``).
        lam: relative ridge weight (``lam' = lam * mean(diag(G))``); ``inf`` returns ``dW_0``.
        rank: output rank ``r``.
        truncation: ``"rrr"`` (reduced-rank ridge, the optimum of the objective at rank
            ``r``) or ``"svd"`` (truncate ``dW*`` in Frobenius norm).
        scale: ``s``, needed only with ``extra_weight`` (the extra target is unscaled).
        extra_weight: ``beta``; the target becomes ``Y = dW_s X_s + beta Y_extra`` with
            ``stats.target_cross = Y_extra X_t^T``. The solution is then dense (``m x n``)
            before truncation: meant for the exploration of output matching, not large models.
        chol: the Cholesky factor of ``G + lam' I`` when the caller shares it between modules (or
            factored it in place to save an ``n x n`` buffer; then pass ``lam_prime`` too:
            ``stats.gram`` is not read).
        lam_prime: the absolute ridge weight, when the caller computed it (with ``chol``).

    Returns:
        :class:`CalibratedFactors` with ``dW_t = s B A``.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    dtype = torch.float64
    B_s, B_0, A_0 = B_s.to(dtype), B_0.to(dtype), A_0.to(dtype)
    if lam == float("inf"):
        f = balanced_factors(B_0, A_0, max_rank=rank)
        return CalibratedFactors(f.B, f.A, float("inf"), f.dropped_energy)
    Z = stats.cross.to(dtype)
    if lam_prime is None or chol is None:
        lam_prime = ridge_lambda(stats.gram, lam)  # no float64 copy of a float32 Gram here
        L = chol if chol is not None else _cholesky(stats.gram, lam_prime)
    else:
        L = chol
    if extra_weight:
        if stats.target_cross is None:
            raise ValueError("extra_weight needs stats.target_cross (moments built with an extra target)")
        # Dense: (Y X^T + lam' dW_0) / s, then W = rhs H^-1 (m x n).
        rhs = stats.target_cross.to(dtype) * (extra_weight / scale)  # built in place: m x n can be 100+ MB
        rhs.addmm_(B_s, Z)
        if B_0.shape[1]:
            rhs.addmm_(B_0, A_0, alpha=lam_prime)
        W = torch.cholesky_solve(rhs.mT, L).mT
        del rhs
        if truncation == "svd":
            P = _top_left_vectors(W, rank)
            dropped = 1 - float((P.mT @ W).square().sum()) / max(float(W.square().sum()), 1e-300)
        else:
            WL = W @ L  # W H W^T = (W L)(W L)^T
            P = _top_left_vectors(WL, rank)
            dropped = 1 - float((P.mT @ WL).square().sum()) / max(float(WL.square().sum()), 1e-300)
        f = balanced_factors(P, P.mT @ W, max_rank=rank)
        return CalibratedFactors(f.B, f.A, lam_prime, max(0.0, dropped))
    B_cat = torch.cat([B_s, lam_prime * B_0], dim=1)  # (m, r_s + r_0)
    R = torch.cat([Z, A_0], dim=0)  # (r_s + r_0, n)
    A_cat = torch.cholesky_solve(R.mT, L).mT  # R H^-1
    if truncation == "svd":
        f = balanced_factors(B_cat, A_cat, max_rank=rank)
        return CalibratedFactors(f.B, f.A, lam_prime, f.dropped_energy)
    # Left singular directions of dW* H^{1/2}: eigenvectors of B' (A' H A'^T) B'^T, A' H A'^T = A' R^T.
    Q_b, R_b = torch.linalg.qr(B_cat)
    core = R_b @ (A_cat @ R.mT) @ R_b.mT
    core = (core + core.mT) / 2
    evals, evecs = torch.linalg.eigh(core)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp(min=0), evecs[:, order]
    keep = min(rank, int((evals > 1e-12 * evals[0].clamp(min=1e-300)).sum())) if evals.numel() else 0
    total = float(evals.sum())
    dropped = float(evals[keep:].sum()) / total if total > 0 else 0.0
    P = Q_b @ evecs[:, :keep]  # (m, keep) orthonormal
    B_new = P
    A_new = (P.mT @ B_cat) @ A_cat
    f = balanced_factors(B_new, A_new, max_rank=rank)
    return CalibratedFactors(f.B, f.A, lam_prime, dropped)


def _top_left_vectors(M: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``M (m, n)``, from the eigenvectors of the smaller Gram matrix."""
    m, n = M.shape
    if m <= n:
        evals, evecs = torch.linalg.eigh(M @ M.mT)
        order = torch.argsort(evals, descending=True)[:rank]
        return evecs[:, order]
    evals, evecs = torch.linalg.eigh(M.mT @ M)
    order = torch.argsort(evals, descending=True)[:rank]
    keep = evals[order] > 1e-12 * evals.abs().max().clamp(min=1e-300)
    U = M @ evecs[:, order[keep]]
    return U / U.norm(dim=0, keepdim=True)


def fit_error(
    B: torch.Tensor,
    A: torch.Tensor,
    B_s: torch.Tensor,
    stats: Moments,
    *,
    scale: float = 1.0,
    extra_weight: float = 0.0,
) -> tuple[float, float]:
    """``(||dW X_t - Y||_F^2, ||Y||_F^2)`` divided by ``s^2``, from the moments alone.

    ``dW = s B A``, ``Y = s B_s A_s X_s (+ beta Y_extra)``. The ratio is the relative fit error
    (1.0 for ``dW = 0``).
    """
    B, A, B_s = B.double(), A.double(), B_s.double()
    gram, Z, K = stats.gram, stats.cross.double(), stats.code_gram.double()
    BtB = B.mT @ B
    AG = (A.to(gram.dtype) @ gram).double()  # (r, n) in the Gram's storage dtype: no n x n float64 copy
    model_energy = float(torch.sum(BtB * (AG @ A.mT)))
    cross = float(torch.sum((B.mT @ B_s) * (A @ Z.mT)))  # tr(dW X (B_s P)^T) = tr(B^T B_s Z A^T)
    target = float(torch.sum((B_s.mT @ B_s) * K))
    if extra_weight:
        assert stats.target_cross is not None and stats.target_code is not None
        c = extra_weight / scale
        cross += c * float(torch.sum(B * (stats.target_cross.double() @ A.mT)))
        target += 2 * c * float(torch.sum(B_s * stats.target_code.double().mT)) + c * c * stats.target_energy
    return max(0.0, model_energy - 2 * cross + target), target


def relative_fit_error(
    B: torch.Tensor,
    A: torch.Tensor,
    B_s: torch.Tensor,
    stats: Moments,
    *,
    scale: float = 1.0,
    extra_weight: float = 0.0,
) -> float:
    """``||dW X_t - Y||_F^2 / ||Y||_F^2`` (0: perfect; 1: as good as no update)."""
    error, target = fit_error(B, A, B_s, stats, scale=scale, extra_weight=extra_weight)
    return error / target if target > 0 else 0.0


def heldout_errors(
    fold_stats: list[Moments],
    candidates: dict[str, Callable[[Moments], tuple[torch.Tensor, torch.Tensor]]],
    B_s: torch.Tensor,
    *,
    scale: float = 1.0,
    extra_weight: float = 0.0,
) -> dict[str, float]:
    """Cross-validated fit error of each candidate, relative to leaving the module out.

    For each fold, every candidate is built from the other folds' moments
    (``candidates[name](train) -> (B, A)``) and scored on the held-out fold with
    :func:`fit_error`; the sums are divided by the held-out error of no update (``"none"``,
    always included, = 1.0). Candidates that ignore their argument (the plain copy) are
    scored the same way.
    """
    if len(fold_stats) < 2:
        raise ValueError("held-out errors need at least two folds")
    errors = dict.fromkeys([*candidates, "none"], 0.0)
    for held in range(len(fold_stats)):
        train = functools.reduce(operator.add, [fold_stats[f] for f in range(len(fold_stats)) if f != held])
        for name, build in candidates.items():
            B, A = build(train)
            errors[name] += fit_error(B, A, B_s, fold_stats[held], scale=scale, extra_weight=extra_weight)[0]
        none_B = B_s.new_zeros(B_s.shape[0], 0)
        none_A = B_s.new_zeros(0, fold_stats[held].gram.shape[0])
        errors["none"] += fit_error(none_B, none_A, B_s, fold_stats[held], scale=scale, extra_weight=extra_weight)[0]
    reference = errors["none"] if errors["none"] > 0 else 1.0
    return {name: value / reference for name, value in errors.items()}


def least_harmful(errors: dict[str, float], preferred: str = "port", tolerance: float = 1e-3) -> str:
    """The candidate with the smallest relative held-out error.

    ``preferred`` is kept unless another candidate is better by more than ``tolerance``
    (in units of the no-update error): differences at the level of float noise, as between
    a port and the copy it reproduces, do not flip the decision.
    """
    best = min(errors, key=lambda name: (errors[name], name != preferred))
    if preferred in errors and errors[preferred] - errors[best] <= tolerance:
        return preferred
    return best


def dense_reference(
    dW_s: torch.Tensor, dW_0: torch.Tensor, X_s: torch.Tensor, X_t: torch.Tensor, lam: float
) -> torch.Tensor:
    """The ridge solution ``(dW_s X_s X_t^T + lam' dW_0)(X_t X_t^T + lam' I)^-1``, densely (tests, float64)."""
    G_tt = X_t @ X_t.mT
    lam_prime = ridge_lambda(G_tt, lam)
    rhs = dW_s @ X_s @ X_t.mT + lam_prime * dW_0
    return rhs @ torch.linalg.inv(G_tt + lam_prime * torch.eye(G_tt.shape[0], dtype=G_tt.dtype))


__all__ = [
    "TRUNCATIONS",
    "CalibratedFactors",
    "Moments",
    "calibrated_update",
    "dense_reference",
    "fit_error",
    "heldout_errors",
    "least_harmful",
    "moments",
    "relative_fit_error",
    "ridge_lambda",
]
