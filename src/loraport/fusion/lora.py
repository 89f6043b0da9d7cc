"""Fuse ``N >= 2`` LoRA adapters trained on one base through their updates ``dW = s B A``, never densified.

Per module (one at a time), with ``D_i = s_i B_i A_i``:

* ``average``, ``task_arithmetic``, ``ties``, ``dare``, ``tsv``, ``iso_c``, ``iso_cts`` run on the
  Core Space of the module's updates (:mod:`~loraport.fusion.core_space`): orthonormal bases
  of the stacked ``B_i`` and ``A_i^T`` and ``(sum r_i) x (sum r_i)`` cores; the merged core is
  lifted back and re-factorised (SVD of the core only). Exact for every method but the
  entrywise ``ties`` and ``dare``, which act on core entries (the Core Space paper's variant:
  on the dense ``dW`` they would be another method). Task-vector methods use ``C = 0`` (the
  shared base): ``task_arithmetic`` is ``scaling sum_i D_i``.
* ``regmean`` streams calibration text through the base with each adapter merged
  (:class:`~loraport.fusion.grams.LayerGrams`; needs the base model) and merges each module
  in factored form (:func:`~loraport.fusion.regmean.regmean_factors`).
* ``rgsp`` (two adapters only) forms each module's dense ``dW`` (it needs SVDs of the two
  updates and their signs) and truncates the result by SVD. Its subspace rank is
  ``min(rank, max(r_A, r_B))``: directions beyond an update's rank have zero singular values
  and arbitrary vectors.

The output rank is bounded by ``rank`` (default ``sum_i r_i``, lossless for ``average`` and
``task_arithmetic``); the energy dropped by the bound is reported per module. Modules present
in one adapter only are copied; a module present in some of ``N > 2`` adapters is fused
among those that have it.

The output keeps A's ``use_rslora``; fused modules carry ``lora_alpha`` such that the scale
is 1 (the balanced factors hold it); copied modules keep their factors and get the alpha that
preserves their scale (``alpha_pattern``).

Example::

    >>> result = fuse_adapters("lora-math", "lora-code", "lora-both", method="average")  # doctest: +SKIP
    >>> result.adapter.modules["model.layers.0.self_attn.q_proj"].rank                  # doctest: +SKIP
    32
    >>> fuse_adapters("lora-a", "lora-b", "lora-abc", more=["lora-c"], method="iso_cts", rank=16)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import (
    GGUF_LORA_NAME,
    LoraAdapter,
    LoraModule,
    adapter_config_for,
    gguf_target,
    is_gguf_file,
    load_adapter,
    output_format,
    save_adapter,
    write_gguf_lora,
)
from ..architectures import KNOWN, architecture_for
from ..calibrate.shared import adapter_deltas
from ..checkpoints import Checkpoint
from ..errors import LoraportError
from ..io import atomic_directory, atomic_file, check_output_dir, check_output_file
from ..lowrank import DEFAULT_RTOL, Factors, balanced_factors, factors_from_svd, frobenius_norm
from .core_space import core_space
from .grams import LayerGrams
from .methods import merge_task_matrices, rgsp_with_options
from .models import FusionResult, copied_action, finish_report, role_name
from .options import FuseOptions, FusionError, resolve_options
from .regmean import regmean_factors
from .report import FusionReport, TensorRecord, layer_of
from .rgsp import position_on_line

ADAPTER_REPORT_NAME = "loraport_fusion_report.json"
AdapterRef = str | os.PathLike[str] | LoraAdapter


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
    return LoraModule(module.name, module.A, module.B, alpha, use_rslora, module.kernel)


def _fused_module(name: str, factors: Factors, like: LoraModule, use_rslora: bool, dtype: torch.dtype) -> LoraModule:
    """The fused factors as a module shaped ``like`` the inputs' (a conv module keeps its kernel)."""
    B, A = factors.B.to(dtype), factors.A.to(dtype)
    if factors.rank == 0:  # PEFT needs r >= 1: a zero update as rank-1 zero factors
        B, A = B.new_zeros(like.shape[0], 1), A.new_zeros(1, like.shape[1])
    rank = int(A.shape[0])
    return LoraModule(name, A, B, _alpha_for_scale(1.0, rank, use_rslora), use_rslora, like.kernel)


def _fuse_module(
    name: str,
    updates: list[tuple[torch.Tensor, torch.Tensor]],
    options: FuseOptions,
    max_rank: int,
    grams: list[torch.Tensor] | None,
) -> tuple[Factors, dict[str, Any]]:
    """Fuse the scaled updates ``(s B_i, A_i)`` of one module; returns the factors and report fields."""
    method = options.method
    fields: dict[str, Any] = {}
    if method == "rgsp":
        (Ba, Aa), (Bb, Ab) = updates
        subspace_rank = min(options.rgsp.rank, max(Aa.shape[0], Ab.shape[0]))
        merged, fields = rgsp_with_options(options, Ba @ Aa, Bb @ Ab, subspace_rank)
        if not torch.isfinite(merged).all():
            raise FusionError(f"module {name}: rgsp produced non-finite values")
        return dense_factors(merged, max_rank), fields
    if method == "regmean":
        assert grams is not None
        B, A = regmean_factors(updates, grams, options.regmean.shrinkage, options.regmean.ridge)
        return balanced_factors(B, A, max_rank=max_rank), fields
    space = core_space(updates)
    if method == "average":
        merged = torch.stack(space.cores).mean(0)
    else:
        merged = options.scaling * merge_task_matrices(options, space.cores, dim=space.dim, name=name)
    if not torch.isfinite(merged).all():
        raise FusionError(f"module {name}: {method} produced non-finite values")
    if len(updates) == 2:
        fields["position"] = position_on_line(space.cores[0], space.cores[1], merged)
    return space.lift(merged, max_rank), fields


def _check_bases(bases: list[Any], names_in: list[str], options: FuseOptions) -> None:
    """Adapters whose ``base_model_name_or_path`` name different models (by the name's last part) are refused.

    ``models/smollm2`` and ``/data/models/smollm2`` pass (the same model saved in two places,
    noted in the report); ``Qwen/Qwen2.5-1.5B`` and ``google/gemma-2-2b`` do not, unless
    ``allow_mismatch``. Adapters that name no base are not checked.
    """
    named = [(i, str(b), Path(str(b).rstrip("/")).name.lower()) for i, b in enumerate(bases) if b]
    other = next((entry for entry in named if entry[2] != named[0][2]), None)
    if other is not None and not options.allow_mismatch:
        (i, first, _), (j, second, _) = named[0], other
        raise FusionError(
            f"{names_in[i]} was trained on {first!r} but {names_in[j]} on {second!r}: LoRAs of different base "
            "models cannot be fused (pass allow_mismatch=True / --allow-mismatch if they are the same model)"
        )


def _load(adapter: AdapterRef, base: Checkpoint | None) -> LoraAdapter:
    return adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter, base=base)


def _module_grams(
    adapters: list[LoraAdapter], base: str | os.PathLike[str] | Checkpoint | None, options: FuseOptions, progress: bool
) -> LayerGrams:
    """RegMean's Grams: the base with each adapter merged, streamed side by side."""
    if base is None:
        base = adapters[0].config.get("base_model_name_or_path")
        if not base:
            raise FusionError("regmean on adapters needs the base model they were trained on (--base)")
    try:
        ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
    except LoraportError as exc:
        raise FusionError(f"regmean on adapters needs the base model they were trained on (--base): {exc}") from None
    shapes = None if ckpt.model_type in KNOWN else {k: ckpt.shape(k) for k in ckpt.keys()}
    arch = architecture_for(ckpt.config, shapes)
    extras = [lambda layer, ad=ad: adapter_deltas(ad, arch, layer) for ad in adapters]
    return LayerGrams([ckpt] * len(adapters), arch, options.regmean, extras, progress)


def fuse_adapters(
    adapter_a: AdapterRef,
    adapter_b: AdapterRef,
    out: str | os.PathLike[str] | None = None,
    *,
    more: Sequence[AdapterRef] = (),
    rank: int | None = None,
    base: str | os.PathLike[str] | Checkpoint | None = None,
    options: FuseOptions | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    out_format: str | None = None,
    **overrides: Any,
) -> FusionResult:
    """Fuse LoRA adapters (PEFT or GGUF) trained on the same base.

    Args:
        adapter_a, adapter_b: adapter directories, GGUF LoRA files or loaded adapters.
        out: if given, the fused adapter is written there atomically: a directory (the adapter
            and the report), or a ``.gguf`` file.
        more: further adapters (``N >= 3``); ``rgsp`` takes two only.
        rank: maximum rank of each fused module (default ``sum_i r_i``).
        base: the base model, needed by ``regmean`` (default: A's ``base_model_name_or_path``
            when that resolves to a local model) and by a GGUF output (the ``.gguf`` base: its
            names, architecture and row order); GGUF inputs read their names from it too.
        out_format: ``peft`` or ``gguf`` (default: ``gguf`` for an ``out`` ending in ``.gguf``,
            else the first input's format).
        options, overrides: as for :func:`loraport.fusion.fuse` (``method="tsv"``, ...);
            ``options.rgsp.rank`` is the RGSP subspace rank, clamped to ``max(r_A, r_B)``.

    Returns:
        A :class:`FusionResult` whose ``adapter`` is the fused :class:`LoraAdapter`.
    """
    started = time.perf_counter()
    options = resolve_options(options, overrides, kind="adapter")
    info = options.info
    count = 2 + len(more)
    if info.max_models is not None and count > info.max_models:
        raise FusionError(f"{options.method} is defined for {info.max_models} adapters (seed 004), got {count}")
    if rank is not None and rank < 1:
        raise FusionError(f"output rank must be >= 1, got {rank}")
    fmt = output_format(out_format, adapter_a, out)
    single_file = out is not None and str(out).endswith(".gguf")
    if single_file:
        check_output_file(out, overwrite)
    elif out is not None:
        check_output_dir(out, overwrite)
    ckpt = base if isinstance(base, Checkpoint) or base is None else Checkpoint.open(base)
    gguf_base = gguf_target(ckpt) if fmt == "gguf" else None
    adapters = [_load(x, ckpt) for x in (adapter_a, adapter_b, *more)]
    names_in = [str(ad.path) if ad.path else f"<adapter {role_name(i)}>" for i, ad in enumerate(adapters)]
    report = FusionReport(
        method=options.method,
        inputs=names_in,
        base=None,
        options={**options.to_dict(), "output_rank": rank},
        kind="adapter",
    )
    bases = [ad.config.get("base_model_name_or_path") for ad in adapters]
    # a GGUF LoRA names the base it was read with (--base), not the one it was trained on
    _check_bases([None if ad.path and is_gguf_file(ad.path) else b for ad, b in zip(adapters, bases, strict=True)],
                 names_in, options)  # fmt: skip
    if len(set(bases)) > 1:
        listed = ", ".join(repr(b) for b in bases)
        report.notes.append(f"adapters name different bases ({listed}); assumed to be the same model")
    grams = _module_grams(adapters, ckpt, options, progress) if info.calibrated else None
    if grams is not None:
        report.base = grams.streams[0].model.ckpt.name
    elif gguf_base is not None:
        report.base = gguf_base.name
    elif base is not None:
        report.notes.append(f"base {base} ignored: {options.method} on adapters does not use one")
    use_rslora = adapters[0].use_rslora
    try:
        modules = merge_adapters(adapters, names_in, options, report, rank=rank, grams=grams, progress=progress)
    finally:
        if grams is not None:
            grams.close()

    config = copy.deepcopy(adapters[0].config)
    config["use_rslora"] = use_rslora
    fused = LoraAdapter(modules=modules, config=config, dtype=adapters[0].dtype)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    fused.config = adapter_config_for(fused, bases[0], leaves, bool(adapters[0].config.get("fan_in_fan_out", False)))
    finish_report(report, grams, started)
    provenance = {"fusion_method": options.method, "inputs": ", ".join(names_in)}
    written = write_fused_adapter(fused, out, overwrite, gguf_base, report, provenance)
    if report_path is not None:
        report.save(report_path)
    return FusionResult(written, report, fused)


def write_fused_adapter(
    fused: LoraAdapter,
    out: str | os.PathLike[str] | None,
    overwrite: bool,
    gguf_base: Any,
    report: FusionReport,
    provenance: dict[str, str],
) -> Path | None:
    """Write a fused adapter atomically: a ``.gguf`` file (``out`` ending in ``.gguf``), or a directory holding the
    adapter (PEFT, or ``adapter.gguf`` with a GGUF base) and the report; ``None`` when ``out`` is."""
    if out is None:
        return None
    report.output = str(Path(out))
    if str(out).endswith(".gguf"):
        assert gguf_base is not None
        with atomic_file(out, overwrite=overwrite) as tmp:
            write_gguf_lora(fused, tmp, gguf_base, provenance=provenance)
        return Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if gguf_base is not None:
            write_gguf_lora(fused, tmp / GGUF_LORA_NAME, gguf_base, provenance=provenance)
        else:
            save_adapter(fused, tmp, config=fused.config)
        report.save(tmp / ADAPTER_REPORT_NAME)
    return Path(out)


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    names_in: Sequence[str],
    options: FuseOptions,
    report: FusionReport,
    *,
    rank: int | None = None,
    grams: LayerGrams | None = None,
    progress: bool = False,
) -> dict[str, LoraModule]:
    """Fuse loaded adapters module by module (no I/O): the fused modules, one record each appended to ``report``.

    The per-module work of :func:`fuse_adapters`, for any front whose adapters are
    :class:`~loraport.adapters.LoraAdapter` objects (image-model LoRAs read from kohya or
    diffusers files too). Modules are matched by name: a module held by one adapter only is
    copied, one held by several is fused among them (conv modules keep their kernel).

    Args:
        adapters: ``N >= 2`` adapters of one base.
        names_in: how each adapter is named in errors and the report (file paths).
        options: a validated :class:`FuseOptions`.
        rank: maximum rank of each fused module (default ``sum_i r_i`` of the module's holders).
        grams: RegMean's input Grams (``regmean`` only; see :func:`fuse_adapters`).

    Raises:
        FusionError: no module is held by two adapters (adapters of different bases), a
            module's update shape differs (unless ``allow_mismatch``), non-finite results.
    """
    adapters = list(adapters)
    names: list[str] = []
    seen: set[str] = set()
    for adapter in adapters:
        for n in adapter.modules:
            if n not in seen:
                seen.add(n)
                names.append(n)
    shared = [n for n in names if sum(n in ad.modules for ad in adapters) > 1]
    if not shared:
        raise FusionError(
            f"{names_in[0]} and {names_in[1]} have no module in common (first: {next(iter(adapters[0].modules))} vs "
            f"{next(iter(adapters[1].modules))}): LoRAs of different base models cannot be fused"
        )
    if grams is not None:  # Grams are served layer by layer
        names.sort(key=lambda n: (grams.module_of(n + ".weight") or (-1, ""))[0])
    use_rslora = adapters[0].use_rslora
    modules: dict[str, LoraModule] = {}
    for name in tqdm(
        names, desc=f"loraport fuse {options.method}", unit="module", file=sys.stderr, disable=not progress
    ):
        t0 = time.perf_counter()
        record, module = _fuse_named(name, adapters, list(names_in), options, rank, use_rslora, grams)
        modules[name] = module
        record.seconds = time.perf_counter() - t0
        report.records.append(record)
    return modules


def _fuse_named(
    name: str,
    adapters: list[LoraAdapter],
    names_in: list[str],
    options: FuseOptions,
    rank: int | None,
    use_rslora: bool,
    grams: LayerGrams | None,
) -> tuple[TensorRecord, LoraModule]:
    """One module name: copied (one holder, mismatch, identical) or fused; returns its record and module."""
    holders = [i for i, ad in enumerate(adapters) if name in ad.modules]
    present = [adapters[i].modules[name] for i in holders]
    first = present[0]
    record = TensorRecord(name, first.shape, str(first.A.dtype), options.method, layer=layer_of(name))
    if len(present) == 1:
        record.action = copied_action(holders[0])
        record.note = f"only in {role_name(holders[0])}"
        return record, _copy_module(first, use_rslora)
    odd = [i for i, m in zip(holders, present, strict=True) if m.shape != first.shape]
    if odd:
        if not options.allow_mismatch:
            i = odd[0]
            raise FusionError(
                f"module {name}: update shape {first.shape} in {names_in[holders[0]]} but "
                f"{adapters[i].modules[name].shape} in {names_in[i]} "
                "(pass allow_mismatch=True / --allow-mismatch to keep A's module)"
            )
        record.action = copied_action(holders[0])
        record.note = f"{role_name(odd[0])} has shape {adapters[odd[0]].modules[name].shape}"
        return record, _copy_module(first, use_rslora)
    if options.keep_identical and all(
        m.scale == first.scale
        and m.A.dtype == first.A.dtype
        and torch.equal(m.A, first.A)
        and torch.equal(m.B, first.B)
        for m in present[1:]
    ):
        record.action = "identical"
        return record, _copy_module(first, use_rslora)
    # Core Space and RegMean work on (sum r_i)-column factors: float64 costs little there and keeps
    # the lifted result at the input's precision; rgsp forms dense m x n updates (float32).
    work = torch.float64 if options.method != "rgsp" or first.A.dtype == torch.float64 else torch.float32
    updates = [_scaled(m, work) for m in present]
    B0, A0 = updates[0]
    norm_first = frobenius_norm(B0, A0)
    diff = max(frobenius_norm(torch.cat([B, -B0], dim=1), torch.cat([A, A0], dim=0)) for B, A in updates[1:])
    record.rel_diff = diff / norm_first if norm_first > 0 else None
    max_rank = rank if rank is not None else sum(m.rank for m in present)
    module_grams = None
    if grams is not None:
        located = grams.module_of(name + ".weight")
        if located is None:
            raise FusionError(f"module {name}: regmean needs a linear module of a decoder layer")
        all_grams = grams.get(*located)
        module_grams = [all_grams[i] for i in holders]  # adapter updates are in Linear layout, Conv1D too
    factors, fields = _fuse_module(name, updates, options, max_rank, module_grams)
    for key, value in fields.items():
        setattr(record, key, value)
    record.out_rank = max(factors.rank, 1)
    record.dropped_energy = factors.dropped_energy
    return record, _fused_module(name, factors, first, use_rslora, first.A.dtype)
