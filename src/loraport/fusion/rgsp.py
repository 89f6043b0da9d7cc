"""RGSP-TEFM: relative Gromov subspace projection fusion of one weight matrix (SPEC sec. 7).

Pure functions on tensors (no I/O). :func:`rgsp_fuse` fuses two same-shape matrices
``W_A, W_B: (m, n)``; :func:`rgsp_align` is the small ``r x r`` part (mapping ``M``, cost
matrices, Gromov-Wasserstein plan, encoding, ``dS``, ``lambda``) on given SVD factors, exposed
so tests can check every intermediate against a float64 reference.

Precision: the ``r x r`` math runs in float64; the big matrices (``W``, ``U``, ``V``,
``tau_*``) in float32 (float64 when the input is float64); the result is cast to ``W_A``'s
dtype by the caller.

Interpretations of seed 004 (SPEC sec. 7 is the authority; each is also in ``docs/fusion.md``):

* ``M = softmax_rows(U_A^T U_B / sqrt(r))`` is ``r x r`` (``W_q = W_k = I``): row ``i`` is
  indexed by A's direction ``i``, column ``j`` by B's direction ``j``. ``U_B' = U_B M^T``,
  so column ``i`` of ``U_B'`` is B's directions mixed into A's index ``i``; likewise
  ``V_B' = V_B M^T``. Singular vectors carry the sign convention of
  :func:`loraport.subspace.top_k_svd` (largest-magnitude entry of each ``U`` column positive);
  ``M`` depends on that convention, which makes it deterministic.
* Cost matrices use singular-value-scaled directions ``C[i, j] = ||x_i - x_j||^2`` with
  ``X = U S`` (plain orthonormal columns give a constant cost), each divided by its max;
  an all-zero cost matrix (``r = 1``, zero weights) is left at zero.
* ``pi*`` is POT's entropic GW plan with uniform marginals ``1/r``; ``d`` is the GW loss from
  its log (``gw_dist``, the quadratic loss without the entropy term). With costs in
  ``[0, 1]`` and a unit-mass plan it lies in ``[0, 1]``; it is clamped there because POT
  warns that an unconverged Sinkhorn can make it slightly negative. The plan counts as
  converged when its marginals are within 0.1% (relative) of ``1/r``; otherwise the solve is
  retried with ``epsilon`` doubled (twice at most) and the epsilon used is reported.
* ``TOS[k, p] = |cos(u_A,k, u_B',p)| exp(-beta d)`` (the seed's cosine of scalar entries of
  ``psi`` is undefined). The ``exp(-beta d)`` factor is a constant and cancels in the
  renormalisation ``pi* <- pi* TOS / sum(pi* TOS)``, so ``beta`` has no effect on the result;
  it is kept for fidelity and reported. If ``pi* TOS`` has zero mass the GW plan is kept.
* ``dS = M (r pi*) (S_B - S_A)``: ``r pi*`` is doubly stochastic before the TOS reweighting
  and has total mass ``r`` after it.
* ``tau_proj = U_rel diag(dS) V_rel^T`` with ``U_rel = (U_A + U_B')/2``, ``V_rel = (V_A + V_B')/2``
  (seed 004's ``U diag U^T`` is only valid for square symmetric weights).
* ``lambda = clamp(sigmoid(-d) mean(TFI), 0, 1)``; ``s_rel`` is in the units of the singular
  values, so ``lambda`` is not scale invariant, and a negative ``s_rel`` (B's spectrum below
  A's) gives ``lambda = 0``.
* ``W* = (W_A + W_B)/2 + gamma (lambda tau_proj + (1 - lambda) tau_ortho)``; with a small
  ``tau_proj`` and ``gamma = 1`` this is close to ``1.5 W_B - 0.5 W_A`` (an extrapolation
  past B): :attr:`RgspRecord.position` measures where ``W*`` lands on the A -> B line.

``W_A == W_B`` gives ``S_B - S_A = 0``, so ``dS = 0``, ``tau_proj = tau_ortho = 0`` and
``W* = (W_A + W_A)/2 = W_A`` bit for bit (halving a doubled float is exact); nothing in the
path divides by a zero difference, so no NaN can leak in.

Example::

    >>> import torch
    >>> W_A = torch.randn(32, 24, generator=torch.Generator().manual_seed(0))
    >>> fused, record = rgsp_fuse(W_A, W_A.clone(), rank=8)
    >>> torch.equal(fused, W_A), record.lam
    (True, 0.0)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..subspace import top_k_svd

DEFAULT_RANK = 64
DEFAULT_EPSILON = 0.05
DEFAULT_BETA = 1.0
DEFAULT_GAMMA = 1.0
DEFAULT_TFI_EPS = 1e-8
DEFAULT_GW_MAX_ITER = 1000
GW_MARGINAL_TOL = 1e-3
GW_RETRIES = 2


@dataclass
class RgspAlignment:
    """The ``r x r`` quantities of RGSP-TEFM for one matrix (float64 unless noted).

    Attributes:
        M: ``(r, r)`` relative mapping, rows sum to 1.
        U_B_prime: ``(m, r)`` ``U_B M^T`` (working dtype). V_B_prime: ``(n, r)`` ``V_B M^T``.
        cost_A, cost_B: ``(r, r)`` normalised cost matrices of ``U_A S_A`` and ``U_B' S_B``.
        plan_gw: ``(r, r)`` entropic GW plan (marginals ``1/r``), before the TOS reweighting.
        tos: ``(r, r)`` task-overlap scores. plan: ``plan_gw * tos`` renormalised to mass 1.
        d: GW distance in ``[0, 1]``. p: ``(r,)`` ``softmax(|S_B - S_A|)``.
        s_rel, h_rel: relative expectation and entropy. tfi: ``(r,)`` importances.
        dS: ``(r,)`` transported singular-value differences. lam: fusion weight in ``[0, 1]``.
        gw_converged: ``False`` when the plan's marginals missed ``1/r`` even after the retries.
        gw_epsilon: the epsilon of the returned plan (``epsilon`` unless a retry doubled it).
    """

    M: torch.Tensor
    U_B_prime: torch.Tensor
    V_B_prime: torch.Tensor
    cost_A: torch.Tensor
    cost_B: torch.Tensor
    plan_gw: torch.Tensor
    tos: torch.Tensor
    plan: torch.Tensor
    d: float
    p: torch.Tensor
    s_rel: float
    h_rel: float
    tfi: torch.Tensor
    dS: torch.Tensor
    lam: float
    gw_converged: bool = True
    gw_epsilon: float = DEFAULT_EPSILON


@dataclass
class RgspRecord:
    """What the report keeps for one fused matrix.

    ``position = <W* - W_A, W_B - W_A> / ||W_B - W_A||^2`` (0: A, 0.5: average, 1: B, 1.5:
    the ``1.5 W_B - 0.5 W_A`` extrapolation); ``None`` when ``W_A == W_B``.
    """

    rank: int
    lam: float
    d: float
    s_rel: float
    h_rel: float
    tau_proj_norm: float
    tau_ortho_norm: float
    position: float | None = None
    gw_converged: bool = True
    gw_epsilon: float = DEFAULT_EPSILON


def relative_mapping(U_A: torch.Tensor, U_B: torch.Tensor) -> torch.Tensor:
    """``M = softmax_rows(U_A^T U_B / sqrt(r))``, ``(r, r)`` float64; ``U_A, U_B: (m, r)``."""
    r = U_A.shape[1]
    return torch.softmax((U_A.double().mT @ U_B.double()) / math.sqrt(r), dim=1)


def direction_cost(X: torch.Tensor) -> torch.Tensor:
    """``C[i, j] = ||x_i - x_j||^2 / max`` over the columns of ``X (m, r)``, float64 ``(r, r)``.

    Computed from the Gram matrix; an all-zero cost stays zero (no 0/0).
    """
    X = X.double()
    gram = X.mT @ X
    gram = (gram + gram.mT) / 2  # exactly symmetric: the GW solver is told it is
    sq = torch.diagonal(gram)
    cost = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    cost.fill_diagonal_(0)
    top = cost.max()
    return cost / top if top > 0 else cost


def gromov_plan(
    cost_A: torch.Tensor, cost_B: torch.Tensor, epsilon: float, max_iter: int = DEFAULT_GW_MAX_ITER
) -> tuple[torch.Tensor, float, bool, float]:
    """Entropic GW plan between ``(cost_A, 1/r)`` and ``(cost_B, 1/r)`` (POT, square loss).

    Converged means the plan's marginals are within ``GW_MARGINAL_TOL`` (relative) of ``1/r``.
    When a near-permutation plan makes Sinkhorn stall (small ``r`` with small ``epsilon``), the
    solve is retried with ``epsilon`` doubled, up to ``GW_RETRIES`` times; the epsilon used is
    returned.

    Returns:
        ``(plan (r, r) float64, d in [0, 1], converged, epsilon used)``.
    """
    import ot  # POT is heavy: import on first use

    r = cost_A.shape[0]
    marginal = np.full(r, 1.0 / r)
    first: tuple[torch.Tensor, float, bool, float] | None = None
    eps = epsilon
    for _ in range(GW_RETRIES + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence is judged on the marginals below
            plan, log = ot.gromov.entropic_gromov_wasserstein(
                cost_A.numpy(),
                cost_B.numpy(),
                marginal,
                marginal,
                loss_fun="square_loss",
                epsilon=eps,
                symmetric=True,
                max_iter=max_iter,
                log=True,
            )
        plan = np.asarray(plan, dtype=np.float64)
        error = r * max(np.abs(plan.sum(axis=0) - 1.0 / r).max(), np.abs(plan.sum(axis=1) - 1.0 / r).max())
        converged = bool(np.isfinite(plan).all() and error <= GW_MARGINAL_TOL)
        d = float(log["gw_dist"])
        d = min(max(d, 0.0), 1.0) if math.isfinite(d) else 1.0
        result = (torch.from_numpy(plan).clone(), d, converged, eps)
        if converged:
            return result
        first = first or result
        eps *= 2
    assert first is not None
    return first


def relative_encoding(S_A: torch.Tensor, S_B: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``p = softmax(|S_B - S_A|)``, ``s_rel = sum p (S_B - S_A)``, ``h_rel = -sum p log p``."""
    diff = S_B.double() - S_A.double()
    p = torch.softmax(diff.abs(), dim=0)
    s_rel = float((p * diff).sum())
    h_rel = float(-(p * torch.log(p.clamp_min(torch.finfo(torch.float64).tiny))).sum())
    return p, s_rel, h_rel


def overlap_scores(U_A: torch.Tensor, U_B_prime: torch.Tensor, d: float, beta: float) -> torch.Tensor:
    """``TOS[k, p] = |cos(u_A,k, u_B',p)| exp(-beta d)``, float64 ``(r, r)``; zero columns give 0."""
    A = U_A.double()
    B = U_B_prime.double()
    norms = torch.linalg.vector_norm(A, dim=0)[:, None] * torch.linalg.vector_norm(B, dim=0)[None, :]
    cross = (A.mT @ B).abs()
    cos = torch.where(norms > 0, cross / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(cross))
    return cos.clamp(max=1.0) * math.exp(-beta * d)


def rgsp_align(
    U_A: torch.Tensor,
    S_A: torch.Tensor,
    V_A: torch.Tensor,
    U_B: torch.Tensor,
    S_B: torch.Tensor,
    V_B: torch.Tensor,
    *,
    epsilon: float = DEFAULT_EPSILON,
    beta: float = DEFAULT_BETA,
    tfi_eps: float = DEFAULT_TFI_EPS,
    gw_max_iter: int = DEFAULT_GW_MAX_ITER,
) -> RgspAlignment:
    """Steps 2-6 of SPEC sec. 7 on top-r factors ``U: (m, r)``, ``S: (r,)``, ``V: (n, r)``."""
    r = U_A.shape[1]
    work = U_A.dtype
    M = relative_mapping(U_A, U_B)
    U_B_prime = U_B @ M.mT.to(work)
    V_B_prime = V_B @ M.mT.to(work)
    # Small products from float64 copies of the (m, r) factors: cheap, and exact enough to test.
    U_B_prime64 = U_B.double() @ M.mT
    cost_A = direction_cost(U_A.double() * S_A.double())
    cost_B = direction_cost(U_B_prime64 * S_B.double())
    plan_gw, d, converged, eps_used = gromov_plan(cost_A, cost_B, epsilon, gw_max_iter)
    p, s_rel, h_rel = relative_encoding(S_A, S_B)
    tfi = p * (s_rel * (1.0 - d) / (h_rel + tfi_eps))
    tos = overlap_scores(U_A, U_B_prime64, d, beta)
    weighted = plan_gw * tos
    mass = float(weighted.sum())
    plan = weighted / mass if mass > 0 and math.isfinite(mass) else plan_gw.clone()
    dS = M @ ((r * plan) @ (S_B.double() - S_A.double()))
    lam = 1.0 / (1.0 + math.exp(d)) * float(tfi.mean())
    lam = min(max(lam, 0.0), 1.0) if math.isfinite(lam) else 0.0
    return RgspAlignment(
        M=M,
        U_B_prime=U_B_prime,
        V_B_prime=V_B_prime,
        cost_A=cost_A,
        cost_B=cost_B,
        plan_gw=plan_gw,
        tos=tos,
        plan=plan,
        d=d,
        p=p,
        s_rel=s_rel,
        h_rel=h_rel,
        tfi=tfi,
        dS=dS,
        lam=lam,
        gw_converged=converged,
        gw_epsilon=eps_used,
    )


def working_dtype(W: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def position_on_line(W_A: torch.Tensor, W_B: torch.Tensor, fused: torch.Tensor) -> float | None:
    """``<W* - W_A, W_B - W_A> / ||W_B - W_A||^2`` (``None`` when ``W_A == W_B``).

    Computed in the working dtype (no float64 copy of a large embedding).
    """
    work = working_dtype(W_A)
    diff = (W_B.to(work) - W_A.to(work)).flatten()
    denom = float(torch.dot(diff, diff))
    if denom == 0 or not math.isfinite(denom):
        return None
    return float(torch.dot(fused.to(work).flatten() - W_A.to(work).flatten(), diff)) / denom


def rgsp_fuse(
    W_A: torch.Tensor,
    W_B: torch.Tensor,
    *,
    rank: int = DEFAULT_RANK,
    epsilon: float = DEFAULT_EPSILON,
    beta: float = DEFAULT_BETA,
    gamma: float = DEFAULT_GAMMA,
    tfi_eps: float = DEFAULT_TFI_EPS,
    svd: str = "exact",
    seed: int = 0,
    gw_max_iter: int = DEFAULT_GW_MAX_ITER,
) -> tuple[torch.Tensor, RgspRecord]:
    """Fuse two same-shape matrices with RGSP-TEFM.

    Args:
        W_A, W_B: ``(m, n)`` weights (any float dtype).
        rank: top-r SVD rank, clamped to ``min(m, n)``.
        epsilon: entropic regularisation of the GW solver (costs are normalised to ``[0, 1]``).
        beta: TOS temperature (cancels in the plan renormalisation; see module docstring).
        gamma: scale of the task term (1 in the seed).
        tfi_eps: the ``eps`` of ``TFI = p s_rel (1 - d) / (h_rel + eps)``.
        svd: ``"exact"`` or ``"randomized"`` (seeded by ``seed``), see :func:`top_k_svd`.

    Returns:
        ``(W*, record)`` with ``W*: (m, n)`` in the working dtype (float32, or float64 for
        float64 input); cast it to the storage dtype.
    """
    if W_A.ndim != 2 or W_A.shape != W_B.shape:
        raise ValueError(f"rgsp needs two matrices of one shape, got {tuple(W_A.shape)} and {tuple(W_B.shape)}")
    work = working_dtype(W_A)
    A = W_A.to(work)
    B = W_B.to(work)
    sub_A = top_k_svd(A, rank, algorithm=svd, seed=seed)
    sub_B = top_k_svd(B, rank, algorithm=svd, seed=seed)
    align = rgsp_align(
        sub_A.U,
        sub_A.S,
        sub_A.V,
        sub_B.U,
        sub_B.S,
        sub_B.V,
        epsilon=epsilon,
        beta=beta,
        tfi_eps=tfi_eps,
        gw_max_iter=gw_max_iter,
    )
    U_rel = (sub_A.U + align.U_B_prime) / 2
    V_rel = (sub_A.V + align.V_B_prime) / 2
    tau_proj = (U_rel * align.dS.to(work)) @ V_rel.mT
    tau_ortho = (B - A) - tau_proj
    fused = (A + B) / 2 + gamma * (align.lam * tau_proj + (1.0 - align.lam) * tau_ortho)
    record = RgspRecord(
        rank=sub_A.k,
        lam=align.lam,
        d=align.d,
        s_rel=align.s_rel,
        h_rel=align.h_rel,
        tau_proj_norm=float(torch.linalg.matrix_norm(tau_proj)),
        tau_ortho_norm=float(torch.linalg.matrix_norm(tau_ortho)),
        position=position_on_line(A, B, fused),
        gw_converged=align.gw_converged,
        gw_epsilon=align.gw_epsilon,
    )
    return fused, record
