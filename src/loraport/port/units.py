"""The unit loop of a port: which subspaces each unit needs, fetch them, run the method, record the result.

A *unit* (:class:`~loraport.pairing.Unit`) is one source module (or part of a fused one) paired
with one target module: decoder-layer projections of language models, named modules of image
models. Both fronts plan and run their units here; ``loraport batch`` plans every job's subspace
requests with :func:`plan_units` before any port runs, so that each distinct subspace is
computed once.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calibrate import CALIBRATED
from ..distill.options import DISTILL
from ..lowrank import frobenius_norm
from ..methods import MethodContext, adapt_dimensions, get_method
from ..pairing import Side, Unit
from ..report import ModuleRecord, TransferReport
from ..store import Request, SubspaceStore
from ..subspace import Subspace, SubspaceCache, above_chance, chance_similarity, similarity
from .options import TransferOptions

Part = tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]  # a ported unit: (unit, record, B, A)


def _similarities(ctx: MethodContext, options: TransferOptions) -> tuple[float, float, float, float, float, float]:
    """sim_U, sim_V, combined sim, above-chance, chance_U, chance_V (SPEC sec. 3)."""
    assert ctx.source is not None and ctx.target is not None
    adapted = adapt_dimensions(ctx)
    assert adapted.U is not None and adapted.V is not None
    k = ctx.target.k
    m_t, n_t = ctx.target_shape
    sim_u = similarity(adapted.U, ctx.target.U)
    sim_v = similarity(adapted.V, ctx.target.V)
    above_u, above_v = above_chance(sim_u, k, m_t), above_chance(sim_v, k, n_t)
    mode = options.similarity
    if mode == "min":
        sim, above = min(sim_u, sim_v), min(above_u, above_v)
    elif mode == "mean":
        sim, above = (sim_u + sim_v) / 2, (above_u + above_v) / 2
    elif mode == "U":
        sim, above = sim_u, above_u
    else:
        sim, above = sim_v, above_v
    return sim_u, sim_v, sim, above, chance_similarity(k, m_t), chance_similarity(k, n_t)


def _as_float(x: torch.Tensor, device: str) -> torch.Tensor:
    return x.to(device=device, dtype=torch.float32)


def port_method(options: TransferOptions) -> Any:
    """The per-unit method a port runs (``calibrated`` and ``distill`` start from their init method's result)."""
    return get_method(options.init_method if options.method in (CALIBRATED, DISTILL) else options.method)


def plan_units(
    units: list[Unit], method: Any, options: TransferOptions
) -> tuple[list[tuple[Unit, int, bool, bool, bool]], list[Request]]:
    """Which subspaces each unit needs: ``(unit, k, same_shape, needs_source, needs_target)`` per unit,
    and the subspace requests ``(source, transposed, tensor, rows, k)`` in the order they are used.

    ``loraport batch`` plans every job's requests with this before any port runs, so that each
    distinct subspace is computed once.
    """
    fallback = get_method(options.fallback) if options.fallback != "skip" else None
    want_sim = options.wants_similarity(method.needs_source or method.needs_target)
    plans: list[tuple[Unit, int, bool, bool, bool]] = []
    requests: list[Request] = []
    for unit in units:
        same = unit.source.shape == unit.target.shape
        k = min(options.subspace_rank, *unit.source.shape, *unit.target.shape)
        if method.same_shape_only and not same:
            need_s = need_t = False
        else:
            need_s = method.needs_source or not same or want_sim
            need_t = method.needs_target or not same or want_sim
        if fallback is not None and options.thresholded:
            need_s, need_t = need_s or fallback.needs_source, need_t or fallback.needs_target
        plans.append((unit, k, same, need_s, need_t))
        requests += _unit_requests(unit, need_s, need_t, k)
    return plans, requests


def port_units(
    units: list[Unit], method: Any, options: TransferOptions, report: TransferReport, progress: bool
) -> list[Part]:
    """:func:`run_units` with a subspace store (memory, disk cache, prefetching reads) opened and closed around it."""
    store = SubspaceStore(
        SubspaceCache(options.cache_dir) if options.use_cache else None,
        options.svd,
        options.oversample,
        options.niter,
        options.seed,
        options.device,
    )
    try:
        parts = run_units(units, method, options, store, report, progress)
    finally:
        store.close()
    if store.cache is not None:
        report.cache_hits, report.cache_misses = store.cache.hits, store.cache.misses
    return parts


def _subspace(store: SubspaceStore, side: Side, k: int) -> Subspace:
    return store.get(side.checkpoint, side.transposed, side.key, side.rows, k)


def _unit_requests(unit: Unit, needs_source: bool, needs_target: bool, k: int) -> list[Request]:
    sides = ([unit.source] if needs_source else []) + ([unit.target] if needs_target else [])
    return [(side.checkpoint, side.transposed, side.key, side.rows, k) for side in sides]


def run_units(
    units: list[Unit],
    method: Any,
    options: TransferOptions,
    store: SubspaceStore,
    report: TransferReport,
    progress: bool,
) -> list[Part]:
    """Run the method on every unit; returns the transferred (unit, record, B, A) in target coordinates.

    Appends one record per unit to ``report``. Any pairing that produces :class:`Unit` s
    (decoder layers of LLMs, named modules of diffusion models) goes through this loop.
    """
    fallback = get_method(options.fallback) if options.fallback != "skip" else None
    plans, requests = plan_units(units, method, options)
    store.plan(requests)
    clamped = [k for _, k, _, need_s, need_t in plans if (need_s or need_t) and k < options.subspace_rank]
    if clamped:
        report.notes.append(
            f"subspace rank {options.subspace_rank} clamped to min(m, n) on {len(clamped)} unit(s) "
            f"(smallest k used: {min(clamped)})"
        )

    results: list[Part] = []
    bar = tqdm(
        plans,
        desc=f"loraport {options.method}",
        unit="module",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    for unit, k, same, need_s, need_t in bar:
        src_mod = unit.source_module
        rows = unit.source.rows
        B_s = src_mod.B if rows is None else src_mod.B[rows[0] : rows[1]]
        record = ModuleRecord(
            source_module=unit.source.module + (f"[{rows[0]}:{rows[1]}]" if rows else ""),
            target_module=unit.target.module
            + (f"[{unit.target.rows[0]}:{unit.target.rows[1]}]" if unit.target.rows else ""),
            role=unit.role,
            source_layer=unit.source.layer,
            target_layer=unit.target.layer,
            source_shape=unit.source.shape,
            target_shape=unit.target.shape,
        )
        report.records.append(record)
        if method.same_shape_only and not same:
            record.decision, record.reason = "skipped", f"{method.name} needs equal shapes"
            continue
        ctx = MethodContext(
            B=_as_float(B_s, options.device),
            A=_as_float(src_mod.A, options.device),
            target_shape=unit.target.shape,
            source=_subspace(store, unit.source, k) if need_s else None,
            target=_subspace(store, unit.target, k) if need_t else None,
        )
        if need_s or need_t:
            record.k = k
        chosen = method
        if ctx.source is not None and ctx.target is not None:
            (record.sim_U, record.sim_V, record.sim, record.sim_above_chance, record.chance_U, record.chance_V) = (
                _similarities(ctx, options)
            )
            leaves = (unit.target.module.rsplit(".", 1)[-1], unit.source.module.rsplit(".", 1)[-1])
            limit = options.threshold_for(unit.role, leaves)
            value = record.sim if options.threshold_on == "raw" else record.sim_above_chance
            if limit is not None and value < limit:
                if fallback is None or (fallback.same_shape_only and not same):
                    record.decision = "skipped"
                    record.reason = f"similarity {value:.3f} below threshold {limit:g}"
                    continue
                chosen = fallback
                record.decision = f"fallback:{fallback.name}"
                record.reason = f"similarity {value:.3f} below threshold {limit:g}"
        result = chosen.fn(ctx)
        record.note = result.note
        scale = src_mod.scale
        record.source_norm = scale * frobenius_norm(ctx.B, ctx.A)
        record.target_norm = scale * frobenius_norm(result.B, result.A)
        record.kept_energy = record.target_norm / record.source_norm if record.source_norm > 0 else 0.0
        if record.target_norm == 0.0:
            record.decision, record.reason = "skipped", "transferred update is zero"
            continue
        results.append((unit, record, result.B, result.A))
    return results


__all__ = ["Part", "plan_units", "port_method", "port_units", "run_units"]
