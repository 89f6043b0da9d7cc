"""Orchestration of a port: pair modules, fetch subspaces, run a method, filter, re-factorise.

The math lives in :mod:`loraport.methods`; this module does I/O, pairing, caching,
progress and the report. Base weights are read one tensor at a time (the next ones are
read in a background thread while the current one is decomposed), decomposed once, and
cached on disk; only subspaces (``U, S, V``) are kept in memory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapters import LoraAdapter, LoraModule, adapter_config_for, load_adapter, lora_scale, save_adapter
from .calibrate import CALIBRATED, FLAG_FIELDS, CalibrationOptions, MappedCalibrator, calibrate, choose_mode
from .calibrate.options import options_summary
from .checkpoints import Checkpoint
from .errors import TransferError
from .io import atomic_directory, check_output_dir
from .lowrank import balanced_factors, frobenius_norm
from .methods import MethodContext, adapt_dimensions, get_method
from .pairing import Pairing, Side, Unit
from .report import ModuleRecord, TransferReport, peak_rss_mb
from .store import Request, SubspaceStore
from .subspace import Subspace, SubspaceCache, above_chance, chance_similarity, similarity

log = logging.getLogger(__name__)

DEFAULT_METHOD = "auto"
DEFAULT_SUBSPACE_RANK = 64
SIMILARITY_MODES = ("min", "mean", "U", "V")
THRESHOLD_ON = ("raw", "above_chance")


@dataclass
class TransferOptions:
    """Settings of a port (the command line's flags).

    Attributes:
        method: a name from :data:`loraport.methods.METHODS`.
        subspace_rank: k, clamped per module to ``min(m, n)`` of both weights (reported).
        svd: ``"randomized"`` (default) or ``"exact"``.
        threshold: skip modules whose similarity is below this (``None``: keep all).
        threshold_by_type: per module type, keyed by role (``attn.q``) or leaf name (``q_proj``).
        threshold_on: compare thresholds with the ``"raw"`` or ``"above_chance"`` similarity.
        similarity: how ``sim_U`` and ``sim_V`` combine: ``min`` (default), ``mean``, ``U``, ``V``.
        fallback: what to do below threshold: ``"skip"`` or another method's name.
        layer_map: explicit target layer -> source layer map (default: relative depth).
        device: where the math runs (``cpu``, ``cuda``).
        cache_dir: subspace cache directory (default :func:`~loraport.subspace.default_cache_dir`);
            ``use_cache=False`` disables it.
        oversample / niter / seed: randomized SVD parameters.
        drop_unsupported: port the LoRA part of adapters with ``modules_to_save`` or
            embedding LoRAs, listing what was dropped.
        report_similarity: compute source/target subspace similarity for every module.
            ``None`` (default): yes for methods that use subspaces, no for ``identity``
            (it would cost two SVDs per module for a number the method ignores);
            always on when a threshold is set.
        calibrated: the settings of ``method="calibrated"``
            (:class:`~loraport.calibrate.CalibrationOptions`: text, samples, ridge, init, mode, ...).
            :func:`transfer` also takes them flat, spelled like the command-line flags
            (``calibration=``, ``calib_rank=``, ``ridge=``, ...; :data:`~loraport.calibrate.FLAG_FIELDS`).
        out_format: image-model LoRAs only: ``kohya``, ``diffusers`` or ``peft`` (one PEFT
            directory per component); ``None`` (default) writes the input's format.
    """

    method: str = DEFAULT_METHOD
    subspace_rank: int = DEFAULT_SUBSPACE_RANK
    svd: str = "randomized"
    threshold: float | None = None
    threshold_by_type: dict[str, float] = field(default_factory=dict)
    threshold_on: str = "raw"
    similarity: str = "min"
    fallback: str = "skip"
    layer_map: dict[int, int] | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    use_cache: bool = True
    oversample: int = 8
    niter: int = 2
    seed: int = 0
    drop_unsupported: bool = False
    report_similarity: bool | None = None
    calibrated: CalibrationOptions = field(default_factory=CalibrationOptions)
    out_format: str | None = None

    def validate(self) -> None:
        if self.method == CALIBRATED:
            self.calibrated.validate()
        try:
            get_method(self.init_method if self.method == CALIBRATED else self.method)
            if self.fallback != "skip":
                fallback = get_method(self.fallback)
                if fallback.name == self.method:
                    raise ValueError("fallback must differ from the method")
        except ValueError as exc:
            raise TransferError(str(exc)) from None
        if self.subspace_rank < 1:
            raise TransferError(f"subspace rank must be >= 1, got {self.subspace_rank}")
        if self.svd not in ("exact", "randomized"):
            raise TransferError(f"--svd must be exact or randomized, got {self.svd!r}")
        if self.threshold_on not in THRESHOLD_ON:
            raise TransferError(f"threshold_on must be one of {THRESHOLD_ON}, got {self.threshold_on!r}")
        if self.similarity not in SIMILARITY_MODES:
            raise TransferError(f"similarity must be one of {SIMILARITY_MODES}, got {self.similarity!r}")
        if self.out_format not in (None, "kohya", "diffusers", "peft"):
            raise TransferError(f"--out-format must be kohya, diffusers or peft, got {self.out_format!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise TransferError("--device cuda requested but CUDA is not available")

    @property
    def init_method(self) -> str:
        """The per-module method whose output calibration starts from (``zero`` starts from the copy's units)."""
        return "identity" if self.calibrated.init == "zero" else self.calibrated.init

    def set(self, name: str, value: Any) -> None:
        """Set an option by its field name or its flag name (``calib_rank`` sets ``calibrated.rank``)."""
        if name in FLAG_FIELDS:
            setattr(self.calibrated, FLAG_FIELDS[name], value)
        elif name in {f.name for f in fields(self)}:
            setattr(self, name, value)
        else:
            raise TypeError(f"transfer() got an unknown option {name!r}")

    @property
    def thresholded(self) -> bool:
        return self.threshold is not None or bool(self.threshold_by_type)

    def wants_similarity(self, method_uses_subspaces: bool) -> bool:
        if self.thresholded:
            return True
        return method_uses_subspaces if self.report_similarity is None else self.report_similarity

    def threshold_for(self, role: str, leaves: Iterable[str]) -> float | None:
        for key in (role, *leaves):
            if key in self.threshold_by_type:
                return self.threshold_by_type[key]
        return self.threshold


@dataclass
class TransferResult:
    """What :func:`transfer` returns: the target adapter, its report, where it was written."""

    adapter: LoraAdapter
    report: TransferReport
    output: Path | None = None


# -- the port ---------------------------------------------------------------------------


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


def transfer(
    adapter: str | os.PathLike[str] | LoraAdapter | Any,
    source_base: str | os.PathLike[str] | Checkpoint | Any,
    target_base: str | os.PathLike[str] | Checkpoint | Any,
    out: str | os.PathLike[str] | None = None,
    *,
    options: TransferOptions | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
    **overrides: Any,
) -> TransferResult:
    """Port a LoRA adapter from ``source_base`` to ``target_base``.

    Args:
        adapter: a PEFT adapter directory or a loaded :class:`~loraport.adapters.LoraAdapter`;
            or an image-model LoRA (a kohya or diffusers ``.safetensors`` file, a directory
            holding one, per-component PEFT directories, or a
            :class:`~loraport.diffusion.DiffusionLora`), ported by
            :func:`loraport.diffusion.transfer_diffusion`.
        source_base / target_base: model directories, hub ids, or open checkpoints (for
            image-model LoRAs: diffusers folders or single-file ``.safetensors`` checkpoints).
        out: if given, the target adapter is written there atomically (nothing is left
            behind on failure; an existing directory needs ``overwrite=True``). Image-model
            LoRAs may also go to a single ``.safetensors`` file.
        options: a :class:`TransferOptions`; keyword ``overrides`` set its fields
            (``method="lorax"``, ``subspace_rank=32``, ...).
        report_path: also write the report (``.json`` + ``.md``; ``.png`` adds a plot).
        progress: show a progress bar on stderr.
        extra_files: text files (name -> content) written into ``out`` in the same atomic
            step as the adapter (``loraport batch`` records each job's identity this way).

    Returns:
        A :class:`TransferResult` with the ported adapter and its report.

    Raises:
        LoraportError: bad input (messages name the file or module); ``TransferError``
            when every module is skipped (the report is still written if asked for).

    Example::

        >>> result = transfer("qwen-lora", "Qwen/Qwen2.5-1.5B", "google/gemma-2-2b",  # doctest: +SKIP
        ...                   out="gemma-lora", method="prolora")
        >>> print(result.report.summary())                                        # doctest: +SKIP
    """
    started = time.perf_counter()
    options = options or TransferOptions()
    for name, value in overrides.items():
        options.set(name, value)
    options.validate()
    if not isinstance(adapter, LoraAdapter):
        from .diffusion.formats import DiffusionLora, detect_format

        if isinstance(adapter, DiffusionLora) or detect_format(adapter) is not None:
            from .diffusion.port import transfer_diffusion

            return transfer_diffusion(
                adapter, source_base, target_base, out, options, report_path, overwrite, progress, started, extra_files
            )
    if options.out_format not in (None, "peft"):
        raise TransferError(f"--out-format {options.out_format} is for image-model LoRAs; LLM adapters are PEFT")
    if out is not None:
        check_output_dir(out, overwrite)
    if not isinstance(adapter, LoraAdapter):
        adapter = load_adapter(adapter, drop_unsupported=options.drop_unsupported)
    src = source_base if isinstance(source_base, Checkpoint) else Checkpoint.open(source_base)
    tgt = target_base if isinstance(target_base, Checkpoint) else Checkpoint.open(target_base)
    calibrated = options.method == CALIBRATED
    method = port_method(options)
    pairing = Pairing(adapter, src, tgt, options.layer_map)

    report = new_report(options, src.name, tgt.name, adapter)
    report.layer_map = pairing.layer_map
    report.notes += pairing.arch_s.notes + pairing.arch_t.notes

    mode = None
    if calibrated:
        mode, notes = choose_mode(options.calibrated, pairing)
        report.notes += notes
    if pairing.layers_s != pairing.layers_t and options.layer_map is None and mode != "mapped":
        report.notes.append(
            f"depths differ ({pairing.layers_s} -> {pairing.layers_t}): layers paired by relative depth"
        )
    if mode == "mapped":
        # The adapter's effect goes to the target's residual writers: no per-module init to compute.
        parts = MappedCalibrator(pairing, adapter, options.calibrated, report, progress, options.device).run()
    else:
        parts = port_units(pairing.units, method, options, report, progress)
        if calibrated:
            parts = calibrate(parts, pairing, adapter, options.calibrated, report, progress, options.device)
    report.records += pairing.unpaired

    modules = assemble_modules(parts)
    target_adapter = LoraAdapter(modules=modules, config=dict(adapter.config), dtype=adapter.dtype)
    check_written(report, modules, started, report_path)
    config = adapter_config_for(
        target_adapter, tgt.name, _target_modules_field(modules, pairing), fan_in_fan_out=pairing.arch_t.transposed
    )
    target_adapter.config = config
    written: Path | None = None
    if out is not None:
        written = write_port_dir(
            out, overwrite, report, lambda tmp: save_adapter(target_adapter, tmp, config=config), extra_files
        )
    finish_report(report, started, report_path)
    return TransferResult(target_adapter, report, written)


def _report_options(options: TransferOptions) -> dict[str, Any]:
    """The options as the report records them: no cache path, the calibration text by name only."""
    values = {f.name: getattr(options, f.name) for f in fields(options) if f.name not in ("cache_dir", "calibrated")}
    if options.method == CALIBRATED:
        values["calibrated"] = options_summary(options.calibrated)
    return values


def new_report(options: TransferOptions, source: str, target: str, adapter: LoraAdapter) -> TransferReport:
    """An empty report for a port of ``adapter`` (options, bases, dropped parts)."""
    return TransferReport(
        method=options.method,
        source_base=source,
        target_base=target,
        adapter=str(adapter.path) if adapter.path else "<in memory>",
        options=_report_options(options),
        dropped=dict(adapter.dropped),
    )


def port_method(options: TransferOptions) -> Any:
    """The per-unit method a port runs (``calibrated`` starts from its init method's result)."""
    return get_method(options.init_method if options.method == CALIBRATED else options.method)


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
) -> list[tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]]:
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


def write_port_dir(
    out: str | os.PathLike[str],
    overwrite: bool,
    report: TransferReport,
    write: Callable[[Path], object],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a port into the directory ``out`` atomically: ``write(tmp)``, the report, any extra files."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write(tmp)
        report.output = str(Path(out))
        report.save(tmp / "loraport_report.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def finish_report(report: TransferReport, started: float, report_path: str | os.PathLike[str] | None) -> None:
    """Stamp the total time and write the report where asked."""
    report.seconds = time.perf_counter() - started
    if report_path is not None:
        report.save(report_path)


def check_written(
    report: TransferReport,
    modules: dict[str, LoraModule],
    started: float,
    report_path: str | os.PathLike[str] | None,
) -> None:
    """Fill the report's totals; with no module to write, save the report (if asked) and raise ``TransferError``."""
    report.output_modules = len(modules)
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = peak_rss_mb()
    if not modules:
        if report_path is not None:
            report.save(report_path)
        reasons = sorted({r.reason for r in report.records if r.reason})
        raise TransferError(
            f"every module was skipped ({len(report.records)} unit(s); "
            f"{'; '.join(reasons[:3]) or 'no units'}); no adapter written"
        )


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
) -> list[tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]]:
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

    results: list[tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]] = []
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


def assemble_modules(results: list[tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]]) -> dict[str, LoraModule]:
    """Group unit results by target module, stack fused parts, re-factorise with balanced factors.

    Plain modules keep rank <= r of their source; a fused target module built from parts
    gets rank <= sum of the parts' ranks (a q, k, v triple can need 3 r). The output alpha
    is the (first) source module's, the factors absorb any change of scale so that
    ``scale_out * B @ A`` equals the transferred update exactly. A conv target keeps its
    kernel (the factors stay flattened, ``A: (r, in * kh * kw)``).
    """
    groups: dict[str, list[tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]]] = {}
    for item in results:
        groups.setdefault(item[0].target.module, []).append(item)
    modules: dict[str, LoraModule] = {}
    for name, items in groups.items():
        first = items[0][0]
        alpha = first.source_module.alpha
        scale_ref = first.source_module.scale
        m_t = first.target.out_rows
        n_t = first.target.shape[1]
        if len(items) == 1 and first.target.rows is None:
            unit, _, B, A = items[0]
            B = B * (unit.source_module.scale / scale_ref)
            max_rank = max(unit.source_module.rank, B.shape[1])  # calibrated may be asked for more
        else:
            blocks_B, blocks_A = [], []
            for unit, _, B_part, A_part in items:
                start, stop = unit.target.rows if unit.target.rows is not None else (0, m_t)
                block = B_part.new_zeros((m_t, B_part.shape[1]))
                block[start:stop] = B_part * (unit.source_module.scale / scale_ref)
                blocks_B.append(block)
                blocks_A.append(A_part)
            B, A = torch.cat(blocks_B, dim=1), torch.cat(blocks_A, dim=0)
            max_rank = sum(max(item[0].source_module.rank, item[2].shape[1]) for item in items)
        factors = balanced_factors(B.double(), A.double(), max_rank=max_rank)
        for item in items:
            item[1].rank = factors.rank
        if factors.rank == 0:
            for item in items:
                item[1].decision, item[1].reason = "skipped", "transferred update is zero"
            continue
        # PEFT scales by alpha / r_out: fold the ratio into the (balanced) factors.
        use_rslora = first.source_module.use_rslora
        ratio = scale_ref / lora_scale(alpha, factors.rank, use_rslora)
        root = ratio**0.5
        B_out = (factors.B * root).to("cpu", torch.float32)
        A_out = (factors.A * root).to("cpu", torch.float32)
        if B_out.shape[0] != m_t or A_out.shape[1] != n_t:
            raise TransferError(f"internal error: {name} factors {tuple(B_out.shape)} x {tuple(A_out.shape)}")
        modules[name] = LoraModule(name, A_out, B_out, alpha, use_rslora, kernel=first.target.kernel)
    return modules


def _target_modules_field(modules: dict[str, LoraModule], pairing: Pairing) -> list[str]:
    """Leaf names (``q_proj``) when they select exactly the written modules, else full paths.

    PEFT matches a leaf name against every module of the model, so leaves are only used
    when the target checkpoint has no other weight with one of those leaf names.
    """
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules})
    matching = [
        key
        for key in pairing.tgt.keys()
        if key.endswith(".weight") and key.removesuffix(".weight").rsplit(".", 1)[-1] in leaves
    ]
    return leaves if len(matching) == len(modules) else sorted(modules)


__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_SUBSPACE_RANK",
    "TransferOptions",
    "TransferResult",
    "assemble_modules",
    "check_written",
    "finish_report",
    "new_report",
    "plan_units",
    "port_method",
    "port_units",
    "run_units",
    "transfer",
    "write_port_dir",
]
