"""Top-k singular subspaces of base weights, their similarity, and an on-disk cache.

All SVD work runs in float32 (float64 if the input is float64), whatever the storage dtype.

Example::

    >>> import torch
    >>> W = torch.randn(64, 48)
    >>> sub = top_k_svd(W, k=8, algorithm="exact")
    >>> sub.U.shape, sub.S.shape, sub.V.shape
    (torch.Size([64, 8]), torch.Size([8]), torch.Size([48, 8]))
    >>> round(similarity(sub.U, sub.U), 6)
    1.0
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .io import default_cache_dir
from .lowrank import stabilize, thin_qr

ALGORITHMS = ("exact", "randomized")
CACHE_VERSION = "1"


@dataclass
class Subspace:
    """Top-k singular triplets of a weight ``W ~ U diag(S) V^T`` plus its row/column norms.

    Attributes:
        U: ``(m, k)`` left singular vectors, orthonormal columns.
        S: ``(k,)`` singular values, descending.
        V: ``(n, k)`` right singular vectors, orthonormal columns.
        row_norms: ``(m,)`` L2 norms of the rows of ``W`` (importance of output coordinates).
        col_norms: ``(n,)`` L2 norms of the columns of ``W`` (importance of input coordinates).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    row_norms: torch.Tensor
    col_norms: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Subspace:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        return Subspace(move(self.U), move(self.S), move(self.V), move(self.row_norms), move(self.col_norms))


def _canonical_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip column signs so each column of U has its largest-magnitude entry positive.

    Singular vectors are defined up to sign; fixing it makes results reproducible across
    algorithms and devices (methods that are projector-based do not depend on it).
    """
    index = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(U, 0, index))
    signs[signs == 0] = 1
    return U * signs, V * signs


def _randomized_svd(
    W: torch.Tensor, k: int, oversample: int, niter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp range finder with stabilised power iterations.

    ``2 niter + 2`` products with ``W`` (as ``torch.svd_lowrank``). The power iterations
    keep their bases well conditioned with one CholeskyQR round (:func:`stabilize`); the
    final bases are orthonormalised with CholeskyQR2. The small factor ``Q^T W`` is taken
    as ``Z = W^T Q (n, l)`` and reduced by a QR, so the only SVD is of an ``l x l`` matrix
    (an SVD of the wide ``l x n`` factor cost several times more).
    """
    m, n = W.shape
    width = min(k + oversample, m, n)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=W.dtype).to(W.device)
    Y = W @ omega
    for _ in range(niter):
        Y = W @ stabilize(W.mT @ stabilize(Y))
    Q = thin_qr(Y)[0]
    # Z = W^T Q = Q_z R_z, so Q^T W = R_z^T Q_z^T = (Ub S Vbh) Q_z^T and W ~ (Q Ub) S (Q_z Vbh^T)^T
    Q_z, R_z = thin_qr(W.mT @ Q)
    Ub, S, Vbh = torch.linalg.svd(R_z.mT)
    return (Q @ Ub)[:, :k], S[:k], (Q_z @ Vbh.mT)[:, :k]


def top_k_svd(
    W: torch.Tensor,
    k: int,
    algorithm: str = "randomized",
    *,
    oversample: int = 8,
    niter: int = 2,
    seed: int = 0,
    norms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Subspace:
    """Top-k SVD of ``W (m, n)``.

    Args:
        k: subspace rank, clamped to ``min(m, n)``.
        algorithm: ``"exact"`` (``torch.linalg.svd``) or ``"randomized"`` (range finder with
            ``oversample`` extra columns and ``niter`` power iterations, seeded so the result
            is deterministic). Randomized falls back to exact when ``k + oversample`` reaches
            half of ``min(m, n)``: there it saves nothing and loses accuracy.
        norms: ``(row_norms, col_norms)`` of ``W`` if the caller already has them.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown SVD algorithm {algorithm!r} (expected one of {ALGORITHMS})")
    if W.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(W.shape)}")
    if not W.dtype.is_floating_point or W.dtype not in (torch.float32, torch.float64):
        W = W.float()
    m, n = W.shape
    k = max(1, min(int(k), m, n))
    if algorithm == "randomized" and 2 * (k + oversample) <= min(m, n):
        U, S, V = _randomized_svd(W, k, oversample, niter, seed)
    else:
        U_full, S_full, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, V = U_full[:, :k], S_full[:k], Vh[:k].mT
    U, V = _canonical_signs(U, V)
    row_norms, col_norms = norms if norms is not None else matrix_norms(W)
    return Subspace(U=U.contiguous(), S=S.contiguous(), V=V.contiguous(), row_norms=row_norms, col_norms=col_norms)


def matrix_norms(W: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norms of the rows and of the columns of ``W``.

    Column norms are accumulated over blocks of ``block`` rows: a strided reduction over
    dim 0 of a large row-major matrix is about 10x slower on CPU.
    """
    if W.shape[0] <= block or W.device.type != "cpu":
        return torch.linalg.vector_norm(W, dim=1), torch.linalg.vector_norm(W, dim=0)
    squares = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
    for start in range(0, W.shape[0], block):
        chunk = W[start : start + block]
        squares.add_((chunk * chunk).sum(0))
    return torch.linalg.vector_norm(W, dim=1), squares.sqrt_()


def similarity(U_s: torch.Tensor, U_t: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between two k-dim subspaces.

    ``sim = ||U_s^T U_t||_F^2 / k`` with orthonormal columns, in ``[0, 1]`` (SPEC sec. 3; the
    seed's division by ``k^2`` bounded it by ``1/k``). ``U_s`` and ``U_t`` must share their
    row dimension; ``k`` is the smaller column count.
    """
    k = min(U_s.shape[1], U_t.shape[1])
    if k == 0:
        return 0.0
    value = float(torch.linalg.matrix_norm(U_s.mT @ U_t) ** 2) / k
    return min(max(value, 0.0), 1.0)


def chance_similarity(k: int, dim: int) -> float:
    """Expected :func:`similarity` of two random k-dim subspaces of R^dim: ``k / dim``."""
    return min(1.0, k / dim) if dim > 0 else 1.0


def above_chance(sim: float, k: int, dim: int) -> float:
    """``(sim - k/dim) / (1 - k/dim)``: 0 at chance, 1 for equal subspaces.

    When ``k >= dim`` both subspaces are the whole space; the value is defined as 1.
    """
    chance = chance_similarity(k, dim)
    if chance >= 1.0:
        return 1.0
    return (sim - chance) / (1.0 - chance)


def orthonormalize(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``X (m, k)`` (reduced QR)."""
    return thin_qr(X)[0]


# -- cache ------------------------------------------------------------------------------


class SubspaceCache:
    """Subspaces on disk, keyed by (weight fingerprint, rows, k, algorithm, parameters).

    Each entry is one small safetensors file (``U, S, V`` and the row/column norms), so a
    second adapter ported to the same target skips reading and decomposing its weights.
    A corrupt entry is ignored and recomputed.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(
        fingerprint: str, rows: tuple[int, int] | None, k: int, algorithm: str, oversample: int, niter: int, seed: int
    ) -> str:
        params = f"v{CACHE_VERSION}|{fingerprint}|{rows}|{k}|{algorithm}"
        if algorithm == "randomized":
            params += f"|{oversample}|{niter}|{seed}"
        return hashlib.sha256(params.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> Subspace | None:
        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            t = load_file(str(path))
            entry = Subspace(t["U"], t["S"], t["V"], t["row_norms"], t["col_norms"])
        except (SafetensorError, OSError, KeyError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, entry: Subspace) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            tensors = {
                "U": entry.U,
                "S": entry.S,
                "V": entry.V,
                "row_norms": entry.row_norms,
                "col_norms": entry.col_norms,
            }
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
