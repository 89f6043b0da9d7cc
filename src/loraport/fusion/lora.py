"""Fuse two LoRA adapters trained on one base through their updates ``dW = s B A``.

Per module (one at a time): ``average`` and ``task_arithmetic`` work on the factored forms
(the sum of two low-rank products is the concatenation of their factors), then
:func:`~loraport.lowrank.balanced_factors` re-factorises without forming ``dW``; ``ties``
(elementwise) and ``rgsp`` (needs an SVD of each update) form the dense ``dW`` of one module
and truncate the result by SVD. Task-vector methods use ``C = 0`` (the shared base), so
``task_arithmetic`` is ``scaling (dW_A + dW_B)``. The output rank is bounded by ``rank``
(default ``r_A + r_B``, lossless for ``average`` and ``task_arithmetic``); the energy
dropped by the bound is reported per module. RGSP's subspace rank is
``min(options.rank, max(r_A, r_B))``: directions beyond an update's rank have zero singular
values and arbitrary vectors. Modules present in one adapter only are copied.

The output keeps A's ``use_rslora``; fused modules carry ``lora_alpha`` such that the scale
is 1 (the balanced factors hold it); copied modules keep their factors and get the alpha that
preserves their scale (``alpha_pattern``).

Example::

    >>> result = fuse_adapters("lora-math", "lora-code", "lora-both", method="average")  # doctest: +SKIP
    >>> result.adapter.modules["model.layers.0.self_attn.q_proj"].rank                  # doctest: +SKIP
    32
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import LoraAdapter, LoraModule, adapter_config_for, load_adapter, save_adapter
from ..io import atomic_directory, check_output_dir
from ..lowrank import DEFAULT_RTOL, Factors, balanced_factors, factors_from_svd, frobenius_norm
from ..report import peak_rss_mb
from . import baselines
from .methods import FuseOptions, FusionError, rgsp_with_options
from .models import FusionResult, resolve_options
from .report import FusionReport, TensorRecord, layer_of
from .rgsp import position_on_line

ADAPTER_REPORT_NAME = "loraport_fusion_report.json"


def dense_factors(D: torch.Tensor, max_rank: int | None = None, rtol: float = DEFAULT_RTOL) -> Factors:
    """Balanced factors of a dense ``D (m, n)`` by SVD, rank ``<= max_rank``.

    Same conventions as :func:`~loraport.lowrank.balanced_factors`: numerically zero
    directions (``S_i <= rtol S_0``) dropped, ``dropped_energy`` the truncated fraction of
    ``||D||_F^2``.
    """
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return factors_from_svd(U, S, Vh, max_rank=max_rank, rtol=rtol)


def _scaled(module: LoraModule, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s B, A)`` in ``work`` dtype: the update as a plain product."""
    return module.B.to(work) * module.scale, module.A.to(work)


def _alpha_for_scale(scale: float, rank: int, use_rslora: bool) -> float:
    return scale * (math.sqrt(rank) if use_rslora else rank)


def _copy_module(module: LoraModule, use_rslora: bool) -> LoraModule:
    """The same factors; alpha adjusted if the output's rsLoRA convention differs."""
    alpha = module.alpha if module.use_rslora == use_rslora else _alpha_for_scale(module.scale, module.rank, use_rslora)
    return LoraModule(module.name, module.A, module.B, alpha, use_rslora)


def _fused_module(name: str, factors: Factors, shape: tuple[int, int], use_rslora: bool) -> LoraModule:
    B, A = factors.B, factors.A
    if factors.rank == 0:  # PEFT needs r >= 1: a zero update as rank-1 zero factors
        B, A = B.new_zeros(shape[0], 1), A.new_zeros(1, shape[1])
    rank = int(A.shape[0])
    return LoraModule(name, A, B, _alpha_for_scale(1.0, rank, use_rslora), use_rslora)


def _fuse_module(a: LoraModule, b: LoraModule, options: FuseOptions, max_rank: int) -> tuple[Factors, dict[str, Any]]:
    work = torch.float64 if a.A.dtype == torch.float64 else torch.float32
    Ba, Aa = _scaled(a, work)
    Bb, Ab = _scaled(b, work)
    method = options.method
    fields: dict[str, Any] = {}
    if method in ("average", "task_arithmetic"):
        weight = 0.5 if method == "average" else options.scaling
        B = torch.cat([Ba, Bb], dim=1) * weight
        A = torch.cat([Aa, Ab], dim=0)
        return balanced_factors(B, A, max_rank=max_rank), fields
    dW_a, dW_b = Ba @ Aa, Bb @ Ab
    if method == "ties":
        merged = baselines.ties([dW_a, dW_b], torch.zeros_like(dW_a), options.density, options.scaling)
        fields["position"] = position_on_line(dW_a, dW_b, merged)
    else:
        merged, fields = rgsp_with_options(options, dW_a, dW_b, min(options.rank, max(a.rank, b.rank)))
    if not torch.isfinite(merged).all():
        raise FusionError(f"module {a.name}: {method} produced non-finite values")
    return dense_factors(merged, max_rank), fields


def fuse_adapters(
    adapter_a: str | os.PathLike[str] | LoraAdapter,
    adapter_b: str | os.PathLike[str] | LoraAdapter,
    out: str | os.PathLike[str] | None = None,
    *,
    rank: int | None = None,
    options: FuseOptions | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> FusionResult:
    """Fuse two PEFT LoRA adapters trained on the same base.

    Args:
        adapter_a, adapter_b: adapter directories or loaded adapters.
        out: if given, the fused adapter is written there atomically.
        rank: maximum rank of each fused module (default ``r_A + r_B``).
        options, overrides: as for :func:`loraport.fusion.fuse` (``method="average"``, ...);
            ``options.rank`` is the RGSP subspace rank, clamped to ``max(r_A, r_B)``.

    Returns:
        A :class:`FusionResult` whose ``adapter`` is the fused :class:`LoraAdapter`.
    """
    started = time.perf_counter()
    options = resolve_options(options, overrides)
    if rank is not None and rank < 1:
        raise FusionError(f"output rank must be >= 1, got {rank}")
    if out is not None:
        check_output_dir(out, overwrite)
    A = adapter_a if isinstance(adapter_a, LoraAdapter) else load_adapter(adapter_a)
    B = adapter_b if isinstance(adapter_b, LoraAdapter) else load_adapter(adapter_b)
    name_a = str(A.path) if A.path else "<adapter A>"
    name_b = str(B.path) if B.path else "<adapter B>"
    report = FusionReport(
        method=options.method,
        inputs=[name_a, name_b],
        base=None,
        options={**options.to_dict(), "output_rank": rank},
        kind="adapter",
    )
    base_a, base_b = A.config.get("base_model_name_or_path"), B.config.get("base_model_name_or_path")
    if base_a != base_b:
        report.notes.append(f"adapters name different bases ({base_a!r} vs {base_b!r}); assumed to be the same model")
    use_rslora = A.use_rslora
    modules: dict[str, LoraModule] = {}
    names = list(A.modules) + [n for n in B.modules if n not in A.modules]
    for name in tqdm(
        names, desc=f"loraport fuse {options.method}", unit="module", file=sys.stderr, disable=not progress
    ):
        t0 = time.perf_counter()
        ma, mb = A.modules.get(name), B.modules.get(name)
        source = ma if ma is not None else mb
        assert source is not None
        record = TensorRecord(name, source.shape, str(source.A.dtype), options.method, layer=layer_of(name))
        if ma is None or mb is None:
            record.action, record.note = (
                ("copied_from_a", "only in A") if mb is None else ("copied_from_b", "only in B")
            )
            modules[name] = _copy_module(source, use_rslora)
        elif ma.shape != mb.shape:
            if not options.allow_mismatch:
                raise FusionError(
                    f"module {name}: update shape {ma.shape} in {name_a} but {mb.shape} in {name_b} "
                    "(pass allow_mismatch=True / --allow-mismatch to keep A's module)"
                )
            record.action, record.note = "copied_from_a", f"B has shape {mb.shape}"
            modules[name] = _copy_module(ma, use_rslora)
        elif (
            options.keep_identical
            and ma.scale == mb.scale
            and torch.equal(ma.A, mb.A)
            and torch.equal(ma.B, mb.B)
            and ma.A.dtype == mb.A.dtype
        ):
            record.action = "identical"
            modules[name] = _copy_module(ma, use_rslora)
        else:
            work = torch.float64 if ma.A.dtype == torch.float64 else torch.float32
            Ba, Aa = _scaled(ma, work)
            Bb, Ab = _scaled(mb, work)
            norm_a = frobenius_norm(Ba, Aa)
            diff = frobenius_norm(torch.cat([Bb, -Ba], dim=1), torch.cat([Ab, Aa], dim=0))
            record.rel_diff = diff / norm_a if norm_a > 0 else None
            max_rank = rank if rank is not None else ma.rank + mb.rank
            factors, fields = _fuse_module(ma, mb, options, max_rank)
            for key, value in fields.items():
                setattr(record, key, value)
            record.out_rank = max(factors.rank, 1)
            record.dropped_energy = factors.dropped_energy
            modules[name] = _fused_module(name, factors, ma.shape, use_rslora)
        record.seconds = time.perf_counter() - t0
        report.records.append(record)

    config = copy.deepcopy(A.config)
    config["use_rslora"] = use_rslora
    fused = LoraAdapter(modules=modules, config=config, dtype=A.dtype)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    fused.config = adapter_config_for(fused, base_a, leaves, bool(A.config.get("fan_in_fan_out", False)))
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = peak_rss_mb()
    written: Path | None = None
    if out is not None:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            save_adapter(fused, tmp, config=fused.config)
            report.output = str(Path(out))
            report.save(tmp / ADAPTER_REPORT_NAME)
        written = Path(out)
    if report_path is not None:
        report.save(report_path)
    return FusionResult(written, report, fused)
