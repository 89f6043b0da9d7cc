"""Baseline merges on tensors: ``average``, ``task_arithmetic``, ``ties`` and ``dare``.

Pure functions, any tensor shape, computed in float32 (float64 for float64 input); the
caller casts to the storage dtype. ``task_arithmetic`` and ``ties`` need the common base
``C``: task vectors are ``tau_i = W_i - W_C``.

* ``average``: ``mean_i W_i``.
* ``task_arithmetic`` (Ilharco et al. 2023): ``W_C + scaling * sum_i tau_i``. Default
  ``scaling = 1``: each task vector is applied in full, so ``A = C + t1, B = C + t2`` gives
  ``C + t1 + t2`` (``scaling = 1/N`` is the plain average).
* ``ties`` (Yadav et al. 2023, TIES-Merging): trim each ``tau_i`` to its top ``density``
  fraction by magnitude (entries tied with the threshold are kept), elect each entry's sign
  as the sign of the summed trimmed values ("mass"), take the disjoint mean (the mean over
  the models whose trimmed value is non-zero and has the elected sign; 0 where none), and
  return ``W_C + scaling * merged``. Defaults from the paper: ``density = 0.2``,
  ``scaling = 1``. With ``density = 1`` and agreeing signs the disjoint mean is the plain
  mean of the task vectors, i.e. ``task_arithmetic`` with ``scaling / N``.
* ``dare`` (Yu et al. 2024, "Language Models are Super Mario"): drop each entry of each
  ``tau_i`` with probability ``1 - density`` and rescale the kept ones by ``1 / density``
  (:func:`drop_and_rescale`, seeded), then combine as task arithmetic (``sum``) or as TIES
  without the magnitude trim (``ties``: elect the sign, disjoint mean), as mergekit's
  ``dare_linear`` / ``dare_ties``; ``W_C + scaling * merged``. The rescaling keeps each
  entry's expectation: ``E[drop_and_rescale(tau)] = tau``.

Example::

    >>> import torch
    >>> C = torch.zeros(4)
    >>> ties([C + torch.tensor([3.0, -1, 0.5, 2]), C + torch.tensor([-1.0, -2, 0.4, 2])], C, density=0.5)
    tensor([ 3., -2.,  0.,  2.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_DENSITY = 0.2
DEFAULT_SCALING = 1.0


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def average(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean_i W_i`` (for two inputs ``(W_A + W_B) / 2``, exact when ``W_A == W_B``)."""
    if not weights:
        raise ValueError("average needs at least one tensor")
    total = _work(weights[0]).clone()
    for w in weights[1:]:
        total += _work(w)
    return total / len(weights)


def task_vectors(weights: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """``tau_i = W_i - W_C`` in the working dtype."""
    C = _work(base)
    return [_work(w) - C for w in weights]


def apply_task_vector(base: torch.Tensor, merged: torch.Tensor, scaling: float = DEFAULT_SCALING) -> torch.Tensor:
    """``W_C + scaling * merged`` in the working dtype."""
    return _work(base) + scaling * merged


def task_arithmetic(
    weights: Sequence[torch.Tensor], base: torch.Tensor, scaling: float = DEFAULT_SCALING
) -> torch.Tensor:
    """``W_C + scaling * sum_i (W_i - W_C)``."""
    taus = task_vectors(weights, base)
    total = taus[0]
    for tau in taus[1:]:
        total = total + tau
    return _work(base) + scaling * total


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries of ``tau`` by magnitude, zero the rest.

    ``k = ceil(density * numel)`` entries; entries equal in magnitude to the ``k``-th largest
    are all kept (deterministic, no tie-breaking by position).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    n = tau.numel()
    k = min(n, max(1, math.ceil(density * n)))
    if k >= n or n == 0:
        return tau.clone()
    magnitude = tau.abs().flatten()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_sign(trimmed: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sign of the summed trimmed task vectors (``-1, 0, +1`` per entry)."""
    total = trimmed[0].clone()
    for t in trimmed[1:]:
        total += t
    return torch.sign(total)


def disjoint_mean(trimmed: Sequence[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Mean over the inputs whose entry is non-zero and agrees with ``sign``; 0 where none."""
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for t in trimmed:
        agree = (torch.sign(t) == sign) & (t != 0)
        total += torch.where(agree, t, torch.zeros_like(t))
        count += agree.to(count.dtype)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def ties_merge(taus: Sequence[torch.Tensor], density: float = DEFAULT_DENSITY) -> torch.Tensor:
    """The merged task vector of TIES: trim each ``tau_i``, elect the sign, disjoint mean."""
    trimmed = [trim(_work(tau), density) for tau in taus]
    return disjoint_mean(trimmed, elect_sign(trimmed))


def ties(
    weights: Sequence[torch.Tensor],
    base: torch.Tensor,
    density: float = DEFAULT_DENSITY,
    scaling: float = DEFAULT_SCALING,
) -> torch.Tensor:
    """TIES-Merging: trim, elect sign, disjoint mean; ``W_C + scaling * merged``."""
    return _work(base) + scaling * ties_merge(task_vectors(weights, base), density)


def drop_and_rescale(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's random sparsification: keep each entry with probability ``density``, divided by ``density``.

    The mask is drawn on the CPU from ``generator`` (same seed, same mask on any device).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = (torch.rand(tau.shape, generator=generator) < density).to(tau.device)
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def dare_merge(
    taus: Sequence[torch.Tensor], density: float, generator: torch.Generator, combine: str = "task_arithmetic"
) -> torch.Tensor:
    """The merged task vector of DARE: drop and rescale each ``tau_i``, then sum (``task_arithmetic``)
    or elect the sign and take the disjoint mean (``ties``)."""
    dropped = [drop_and_rescale(_work(tau), density, generator) for tau in taus]
    if combine == "ties":
        return disjoint_mean(dropped, elect_sign(dropped))
    if combine != "task_arithmetic":
        raise ValueError(f"combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    total = dropped[0]
    for tau in dropped[1:]:
        total = total + tau
    return total


def dare(
    weights: Sequence[torch.Tensor],
    base: torch.Tensor,
    density: float,
    scaling: float = DEFAULT_SCALING,
    *,
    generator: torch.Generator,
    combine: str = "task_arithmetic",
) -> torch.Tensor:
    """DARE: drop and rescale the task vectors, combine them; ``W_C + scaling * merged``."""
    return _work(base) + scaling * dare_merge(task_vectors(weights, base), density, generator, combine)
