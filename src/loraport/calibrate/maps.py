"""Maps between two models' hidden states, and which layers to pair: pure functions of moments.

A map ``M: (d_t, d_s)`` predicts the target's hidden state from the source's at an aligned
token position: ``y - mu_y ~ M (x - mu_x)``. It is fitted from moments summed over positions
(:class:`MapMoments`), so the streaming code never keeps activations:

- ``ridge``: ``M = C_yx (C_xx + mu' I)^-1``, ``mu' = mu * mean(diag(C_xx))``;
- ``orthogonal`` (scaled Procrustes): ``M = a U V^T`` from ``C_yx = U S V^T`` and
  ``a = sum(S) / tr(C_xx)``: a rotation (semi-orthogonal across widths) and one scale;
- ``cca``: ridge through the top canonical directions: with ``Wx = (C_xx + mu' I)^-1/2`` and
  ``Wy = (C_yy + mu' I)^-1/2``, ``K = Wy C_yx Wx = U S V^T``, ``M = Wy^-1 U_k S_k V_k^T Wx`` keeping
  the ``k`` canonical correlations above ``CCA_MIN_CORRELATION``.

``R^2`` on held-out moments (:func:`map_r2`) measures how related the two models are at that
depth. Layers are paired by linear CKA between the residual streams over a sample of aligned
positions (:func:`linear_cka`), with an order-preserving assignment (:func:`monotone_pairing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CCA_MIN_CORRELATION = 0.1
F64 = torch.float64


@dataclass
class MapMoments:
    """Sums over aligned positions of source states ``x (d_s)`` and target states ``y (d_t)``, float64."""

    count: int
    sum_x: torch.Tensor  # (d_s,)
    sum_y: torch.Tensor  # (d_t,)
    xx: torch.Tensor  # (d_s, d_s)
    yx: torch.Tensor  # (d_t, d_s)
    yy: torch.Tensor  # (d_t, d_t)
    rms_x: float = 0.0  # sum over positions of each state's RMS
    rms_y: float = 0.0

    @classmethod
    def zeros(cls, d_s: int, d_t: int, device: torch.device | str = "cpu") -> MapMoments:
        z = lambda *shape: torch.zeros(*shape, dtype=F64, device=device)  # noqa: E731
        return cls(0, z(d_s), z(d_t), z(d_s, d_s), z(d_t, d_s), z(d_t, d_t))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add positions ``x: (T, d_s)``, ``y: (T, d_t)`` (float32 products, float64 sums)."""
        x, y = x.float(), y.float()
        self.count += int(x.shape[0])
        self.sum_x += x.sum(0, dtype=F64)
        self.sum_y += y.sum(0, dtype=F64)
        self.xx += (x.mT @ x).double()
        self.yx += (y.mT @ x).double()
        self.yy += (y.mT @ y).double()
        self.rms_x += float(x.square().mean(-1).sqrt().sum(dtype=F64))
        self.rms_y += float(y.square().mean(-1).sqrt().sum(dtype=F64))

    def __add__(self, other: MapMoments) -> MapMoments:
        return MapMoments(
            self.count + other.count,
            self.sum_x + other.sum_x,
            self.sum_y + other.sum_y,
            self.xx + other.xx,
            self.yx + other.yx,
            self.yy + other.yy,
            self.rms_x + other.rms_x,
            self.rms_y + other.rms_y,
        )

    @property
    def rms_ratio(self) -> float:
        """Mean RMS of the target's states over the source's."""
        return self.rms_y / self.rms_x if self.rms_x > 0 else 1.0

    def centered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Covariances ``C_xx, C_yx, C_yy`` (divided by the count)."""
        n = max(self.count, 1)
        mx, my = self.sum_x / n, self.sum_y / n
        return (
            self.xx / n - torch.outer(mx, mx),
            self.yx / n - torch.outer(my, mx),
            self.yy / n - torch.outer(my, my),
        )


def _inverse_sqrt(C: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C + ridge I)^-1/2`` and ``(C + ridge I)^1/2`` of a symmetric PSD matrix."""
    evals, evecs = torch.linalg.eigh(C)
    evals = evals.clamp(min=0) + ridge
    return (evecs * evals.rsqrt()) @ evecs.mT, (evecs * evals.sqrt()) @ evecs.mT


@dataclass
class OutputAnchor:
    """What makes two models' states decode to the same tokens: ``P M ~ Q`` over the shared vocabulary.

    ``P: (V, d_t)`` and ``Q: (V, d_s)`` are the target's and source's output-head rows of the
    tokens both vocabularies hold, each scaled by its final norm's gain (the logit lens, up
    to the per-token RMS); only ``P^T P`` and ``P^T Q`` are kept. ``tokens`` counts them.
    """

    PtP: torch.Tensor  # (d_t, d_t)
    PtQ: torch.Tensor  # (d_t, d_s)
    tokens: int

    @classmethod
    def from_heads(cls, P: torch.Tensor, Q: torch.Tensor) -> OutputAnchor:
        P, Q = P.double(), Q.double()
        return cls(P.mT @ P, P.mT @ Q, int(P.shape[0]))


def fit_map(
    moments: MapMoments,
    kind: str = "ridge",
    ridge: float = 0.01,
    anchor: OutputAnchor | None = None,
    anchor_weight: float = 0.0,
    rms_ratio: float = 1.0,
) -> torch.Tensor:
    """The map ``M: (d_t, d_s)`` of the module docstring, from summed moments.

    Args:
        moments: sums over aligned positions.
        kind: ``ridge``, ``orthogonal`` or ``cca``.
        ridge: relative ridge ``mu`` (``mu' = mu * mean(diag(C_xx))``).
        anchor / anchor_weight: ``ridge`` only: also ask ``P M ~ rms_ratio Q`` (the mapped
            state decodes to the same tokens, :class:`OutputAnchor`), weighted by
            ``anchor_weight`` in units of ``mean(eig(C_xx)) / mean(eig(P^T P))``. The normal
            equations ``M (C_xx + mu' I) + w' P^T P M = C_yx + w' rms_ratio P^T Q`` (a Sylvester
            equation) are solved in the eigenbases of both sides.
        rms_ratio: the target's typical state norm over the source's, so decoded logits match
            after each model's final norm.
    """
    Cxx, Cyx, Cyy = moments.centered()
    mu = ridge * float(torch.diagonal(Cxx).mean().clamp(min=1e-30))
    if kind == "ridge":
        if anchor is not None and anchor_weight > 0:
            PtP, PtQ = anchor.PtP.to(Cxx), anchor.PtQ.to(Cxx)
            w = anchor_weight * float(torch.diagonal(Cxx).mean()) / max(float(torch.diagonal(PtP).mean()), 1e-30)
            la, Ea = torch.linalg.eigh(PtP)
            lb, Eb = torch.linalg.eigh(Cxx)
            rhs = Ea.mT @ (Cyx + (w * rms_ratio) * PtQ) @ Eb
            return Ea @ (rhs / (w * la.clamp(min=0)[:, None] + lb.clamp(min=0)[None, :] + mu)) @ Eb.mT
        H = Cxx.clone()
        H.diagonal().add_(mu)
        return torch.linalg.solve(H, Cyx.mT).mT
    if kind == "orthogonal":
        U, S, Vh = torch.linalg.svd(Cyx, full_matrices=False)
        scale = float(S.sum()) / max(float(torch.trace(Cxx)), 1e-30)
        return scale * (U @ Vh)
    if kind == "cca":
        mu_y = ridge * float(torch.diagonal(Cyy).mean().clamp(min=1e-30))
        Wx, _ = _inverse_sqrt(Cxx, mu)
        Wy, Wy_inv = _inverse_sqrt(Cyy, mu_y)
        U, S, Vh = torch.linalg.svd(Wy @ Cyx @ Wx, full_matrices=False)
        keep = max(1, int((S > CCA_MIN_CORRELATION).sum()))
        return Wy_inv @ (U[:, :keep] * S[:keep]) @ Vh[:keep] @ Wx
    raise ValueError(f"map kind must be ridge, orthogonal or cca, got {kind!r}")


def map_r2(M: torch.Tensor, held: MapMoments) -> float:
    """``1 - E||y - mu_y - M (x - mu_x)||^2 / E||y - mu_y||^2`` on ``held`` (its own means)."""
    Cxx, Cyx, Cyy = held.centered()
    M = M.to(F64)
    total = float(torch.trace(Cyy))
    error = total - 2 * float(torch.sum(M * Cyx)) + float(torch.sum((M @ Cxx) * M))
    return 1.0 - error / total if total > 0 else 0.0


def centered_gram(H: torch.Tensor) -> torch.Tensor:
    """``Hc Hc^T`` (``H: (N, d)`` positions x features, centered over positions), float64."""
    Hc = H.double() - H.double().mean(0, keepdim=True)
    return Hc @ Hc.mT


def linear_cka(K_s: torch.Tensor, K_t: torch.Tensor) -> float:
    """Linear CKA of two representations of the same positions, from their centered Gram matrices."""
    num = float(torch.sum(K_s * K_t))
    den = float(torch.linalg.matrix_norm(K_s)) * float(torch.linalg.matrix_norm(K_t))
    return num / den if den > 0 else 0.0


def monotone_pairing(similarity: torch.Tensor) -> dict[int, int]:
    """Target layer -> source layer maximising the summed similarity, source layers non-decreasing.

    Args:
        similarity: ``(L_s, L_t)`` (e.g. CKA of source layer i's and target layer j's outputs).

    The last target layer is paired with the last source layer: the adapter's effect is carried
    cumulatively, and only that pairing carries all of it to the output. Dynamic programming:
    ``best[j][i]`` = the best total for target layers ``0..j`` with target ``j`` on source ``i``;
    ``O(L_s L_t)``.
    """
    L_s, L_t = similarity.shape
    S = similarity.to(F64)
    best = torch.empty(L_t, L_s, dtype=F64)
    choice = torch.zeros(L_t, L_s, dtype=torch.long)
    best[0] = S[:, 0]
    for j in range(1, L_t):
        running, arg = -torch.inf, 0
        for i in range(L_s):
            if best[j - 1, i] > running:
                running, arg = float(best[j - 1, i]), i
            best[j, i] = running + S[i, j]
            choice[j, i] = arg
    pairing: dict[int, int] = {}
    i = L_s - 1
    for j in range(L_t - 1, -1, -1):
        pairing[j] = i
        i = int(choice[j, i])
    return dict(sorted(pairing.items()))


__all__ = [
    "MapMoments",
    "OutputAnchor",
    "centered_gram",
    "fit_map",
    "linear_cka",
    "map_r2",
    "monotone_pairing",
]
