"""The per-tensor dispatch of the fusion methods (the registry itself: :mod:`~loraport.fusion.registry`).

Every method is a pure function on tensors elsewhere (:mod:`~loraport.fusion.baselines`,
:mod:`~loraport.fusion.subspace_merge`, :mod:`~loraport.fusion.regmean`,
:mod:`~loraport.fusion.rgsp`); this module says which inputs each needs and calls it.

* :func:`merge_task_matrices` merges task matrices ``D_i`` (``W_i - W_0`` for models, Core
  Space cores for adapters) with a task-vector method; the caller adds ``W_0 + scaling * D``.
* :func:`merge_tensor` fuses one tensor of ``N`` models.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from . import baselines, subspace_merge
from .options import DEFAULT_EXCLUDE, FuseOptions, FusionError
from .registry import FUSION_METHODS, FusionMethod
from .regmean import regmean
from .rgsp import RgspRecord, position_on_line, rgsp_fuse


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and a stable hash of the tensor ``name`` (DARE's masks)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def merge_task_matrices(
    options: FuseOptions, deltas: Sequence[torch.Tensor], *, dim: int | None = None, name: str = ""
) -> torch.Tensor:
    """The merged task matrix ``D`` of a task-vector method (before ``W_0 + scaling * D``).

    Args:
        deltas: ``D_i`` of one tensor, one shape (working dtype).
        dim: ``d`` of the subspace methods' budgets (default ``min(m, n)``; adapters: the core size).
        name: the tensor's name (seeds DARE's masks).
    """
    method = options.method
    if method == "task_arithmetic":
        return torch.stack(list(deltas)).sum(0)
    if method == "ties":
        return baselines.ties_merge(deltas, options.ties.density)
    if method == "dare":
        generator = tensor_generator(options.dare.seed, name)
        return baselines.dare_merge(deltas, options.dare.density, generator, options.dare.combine)
    if method == "tsv":
        return subspace_merge.tsv(deltas, dim)
    if method == "iso_c":
        return subspace_merge.iso_c(deltas)
    if method == "iso_cts":
        return subspace_merge.iso_cts(deltas, options.iso_cts.common_fraction, dim)
    raise FusionError(f"{method} is not a task-vector method")  # pragma: no cover - callers check


def rgsp_with_options(
    options: FuseOptions, W_A: torch.Tensor, W_B: torch.Tensor, rank: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`~loraport.fusion.rgsp.rgsp_fuse` with ``options``' settings at ``rank``; ``(merged, record fields)``."""
    settings = options.rgsp
    merged, record = rgsp_fuse(
        W_A,
        W_B,
        rank=rank,
        epsilon=settings.epsilon,
        beta=settings.beta,
        gamma=settings.gamma,
        tfi_eps=settings.tfi_eps,
        svd=settings.svd,
        seed=settings.seed,
        gw_max_iter=settings.gw_max_iter,
    )
    return merged, rgsp_fields(record)


def merge_tensor(
    options: FuseOptions,
    *weights: torch.Tensor,
    base: torch.Tensor | None = None,
    grams: Sequence[torch.Tensor] | None = None,
    name: str = "",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run ``options.method`` on one tensor of ``N >= 2`` models; returns ``(merged, record fields)``.

    Args:
        weights: ``W_1 .. W_N``, one shape.
        base: ``W_C`` for task-vector methods.
        grams: RegMean's input Grams, one per model (``(n, n)`` for ``W: (m, n)`` in Linear layout).
        name: the tensor's name (seeds DARE).

    Returns:
        The merged tensor in the working dtype (float64 for RegMean) and report fields
        (``position`` on the A -> B line for two models).
    """
    method = options.method
    info = FUSION_METHODS[method]
    if info.max_models is not None and len(weights) > info.max_models:
        raise FusionError(f"{method} fuses {info.max_models} models, got {len(weights)}")
    if method == "rgsp":
        return rgsp_with_options(options, weights[0], weights[1], options.rgsp.rank)
    if method == "average":
        merged = baselines.average(weights)
    elif method == "regmean":
        if grams is None:
            raise FusionError("regmean needs each model's input Gram matrix")
        merged = regmean(weights, grams, options.regmean.shrinkage, options.regmean.ridge)
    else:
        if base is None:
            raise FusionError(f"{method} needs the common base C")
        deltas = baselines.task_vectors(weights, base)
        merged = baselines.apply_task_vector(base, merge_task_matrices(options, deltas, name=name), options.scaling)
    fields: dict[str, Any] = {}
    if len(weights) == 2:
        fields["position"] = position_on_line(weights[0], weights[1], merged)
    return merged, fields


def rgsp_fields(record: RgspRecord) -> dict[str, Any]:
    return {
        "rank": record.rank,
        "lam": record.lam,
        "d": record.d,
        "s_rel": record.s_rel,
        "h_rel": record.h_rel,
        "tau_proj_norm": record.tau_proj_norm,
        "tau_ortho_norm": record.tau_ortho_norm,
        "position": record.position,
        "gw_converged": record.gw_converged,
        "gw_epsilon": record.gw_epsilon,
    }


__all__ = [
    "DEFAULT_EXCLUDE",
    "FUSION_METHODS",
    "FuseOptions",
    "FusionError",
    "FusionMethod",
    "merge_task_matrices",
    "merge_tensor",
    "rgsp_fields",
    "rgsp_with_options",
    "tensor_generator",
]
