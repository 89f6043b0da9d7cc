"""Fuse fine-tuned models tensor by tensor into a new model directory (SPEC sec. 7 and 12).

:func:`fuse` opens the ``N >= 2`` models (and the base C for task-vector methods) lazily
with :class:`~loraport.checkpoints.Checkpoint`, checks they share an architecture, and
processes **one tensor at a time**: selected tensors (by default every 2-D weight except
embeddings and the output head) go through the method, other floating tensors are averaged,
tensors that are bit-identical in every model are copied. RegMean first streams calibration
text through every model (:class:`~loraport.fusion.grams.LayerGrams`) and takes the decoder
layers' tensors in layer order; selected tensors that are not a decoder layer's linear
weight get its fallback (average or task arithmetic). The result is written as sharded
safetensors into an atomic output directory, in A's dtype per tensor, with ``config.json``,
``generation_config.json`` and the tokenizer files copied from A, plus a per-tensor report.

Example::

    >>> result = fuse("runs/model-a", "runs/model-b", "runs/fused", method="rgsp")  # doctest: +SKIP
    >>> result = fuse("runs/a", "runs/b", "runs/abc", more=["runs/c"], method="tsv", base="runs/base")  # doctest: +SKIP
    >>> print(result.report.summary())                                             # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import CONFIG_NAME as ADAPTER_CONFIG
from ..adapters import is_gguf_lora
from ..architectures import KNOWN, architecture_for
from ..checkpoints import Checkpoint
from ..io import atomic_directory, check_output_dir
from ..report import peak_rss_mb
from .baselines import average, task_arithmetic
from .grams import LayerGrams
from .methods import merge_tensor
from .options import FuseOptions, FusionError, resolve_options
from .report import FusionReport, TensorRecord, layer_of
from .rgsp import position_on_line
from .writer import ShardedWriter

REPORT_NAME = "loraport_fusion_report.json"


@dataclass
class FusionResult:
    """The written directory (``None`` for in-memory adapter fusion) and the report."""

    output: Path | None
    report: FusionReport
    adapter: Any = None


ModelRef = str | os.PathLike[str] | Checkpoint


def _open(model: ModelRef, stack: ExitStack) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    if (Path(model) / ADAPTER_CONFIG).exists() or is_gguf_lora(model):
        raise FusionError(f"{model}: is a LoRA adapter (use fuse_adapters, or pass two adapters)")
    ckpt = Checkpoint.open(model)
    stack.callback(ckpt.close)
    return ckpt


def _check_match(a: Checkpoint, b: Checkpoint, options: FuseOptions, report: FusionReport, role: str) -> None:
    """Same ``model_type``, tensor names and shapes as A, or a :class:`FusionError` naming the tensor.

    ``role`` is ``"B"``, ``"model 3"``, ... or ``"base"``: the base may have fewer tensors.
    """
    allow = options.allow_mismatch
    hint = " (pass allow_mismatch=True / --allow-mismatch to fuse anyway)"
    if a.model_type != b.model_type:
        message = f"{a.name} is model_type {a.model_type!r} but {role} {b.name} is {b.model_type!r}"
        if not allow:
            raise FusionError(f"different architectures: {message}{hint}")
        report.notes.append(message)
    keys_b = set(b.keys())
    keys_a = set(a.keys())
    only_a = [k for k in a.keys() if k not in keys_b]
    only_b = [k for k in b.keys() if k not in keys_a]
    if (only_a or only_b) and not allow and role != "base":
        first, where, missing = (only_a[0], a.name, b.name) if only_a else (only_b[0], b.name, a.name)
        raise FusionError(
            f"tensor {first!r} is in {where} but not in {missing} ({len(only_a)} tensor(s) only in A, "
            f"{len(only_b)} only in {role}): different architectures{hint}"
        )
    for key in a.keys():
        if key in keys_b and a.shape(key) != b.shape(key):
            message = f"tensor {key!r}: shape {a.shape(key)} in {a.name} but {b.shape(key)} in {role} {b.name}"
            if not allow:
                raise FusionError(f"shape mismatch: {message}{hint}")
            report.notes.append(message)


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.float()))


def role_name(index: int) -> str:
    """``A``, ``B``, then ``model 3``, ``model 4``, ... (0-based ``index``)."""
    return "AB"[index] if index < 2 else f"model {index + 1}"


def copied_action(index: int) -> str:
    """The report action of a tensor copied from input ``index``: ``copied_from_a``, ``copied_from_model_3``."""
    return "copied_from_" + role_name(index).replace(" ", "_").lower()


def fuse(
    model_a: ModelRef,
    model_b: ModelRef,
    out: str | os.PathLike[str],
    *,
    more: Sequence[ModelRef] = (),
    base: ModelRef | None = None,
    options: FuseOptions | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> FusionResult:
    """Fuse models A, B (and ``more``) into a new model directory ``out``.

    Args:
        model_a, model_b: model directories, hub ids or open checkpoints of one architecture.
        out: output directory, written atomically (nothing is left on failure; an existing
            directory needs ``overwrite=True``).
        more: further models (``N >= 3`` inputs); ``rgsp`` takes two only.
        base: the common base C, required by the task-vector methods (``task_arithmetic``,
            ``ties``, ``dare``, ``tsv``, ``iso_c``, ``iso_cts``).
        options: a :class:`FuseOptions`; keyword ``overrides`` set its fields or its method
            groups' fields (``method="ties"``, ``density=0.5``, ``gamma=0.5``, ``calibration="text.txt"``).
        report_path: also write the report there (``.json`` + ``.md``); the output directory
            always gets ``loraport_fusion_report.json`` / ``.md``.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`FusionResult` with the output path and the :class:`FusionReport`.

    Raises:
        LoraportError: unreadable inputs, different architectures, shape mismatches,
            a task-vector method without a base, rgsp with more than two models, regmean
            without calibration text, an existing ``out``.
    """
    started = time.perf_counter()
    options = resolve_options(options, overrides, kind="model")
    info = options.info
    inputs = [model_a, model_b, *more]
    if info.max_models is not None and len(inputs) > info.max_models:
        raise FusionError(
            f"{options.method} is defined for {info.max_models} models (seed 004), got {len(inputs)}: "
            "use average, task_arithmetic, ties, dare, tsv, iso_c, iso_cts or regmean for more"
        )
    out_path = check_output_dir(out, overwrite)
    if options.needs_base and base is None:
        hint = "; or choose a method without one (--method average, regmean, rgsp)"
        raise FusionError(f"method {options.method} needs the common base model C of the inputs (--base){hint}")
    with ExitStack() as stack:
        ckpts = [_open(model, stack) for model in inputs]
        ckpt_c = _open(base, stack) if base is not None and options.needs_base else None
        report = FusionReport(
            method=options.method,
            inputs=[c.name for c in ckpts],
            base=ckpt_c.name if ckpt_c is not None else None,
            options=options.to_dict(),
        )
        if base is not None and ckpt_c is None:
            report.notes.append(f"base {base} ignored: {options.method} does not use one")
        for index, other in enumerate(ckpts[1:], start=1):
            _check_match(ckpts[0], other, options, report, role_name(index))
        if ckpt_c is not None:
            _check_match(ckpts[0], ckpt_c, options, report, "base")
        grams = _layer_grams(ckpts, options, report, progress) if info.calibrated else None
        if grams is not None:
            stack.callback(grams.close)
        with atomic_directory(out_path, overwrite=overwrite) as tmp:
            writer = ShardedWriter(tmp, options.shard_size)
            _fuse_tensors(ckpts, ckpt_c, options, writer, report, progress, grams)
            writer.close()
            side_files = ckpts[0].side_files()  # config and tokenizer (a GGUF's: from its metadata)
            for name, content in side_files.items():
                (tmp / name).write_bytes(content)
            copied = sorted(side_files)
            if "config.json" not in copied:
                report.notes.append(f"{ckpts[0].name} has no config.json: the output is not loadable by transformers")
            finish_report(report, grams, started)
            report.output = str(out_path)
            report.save(tmp / REPORT_NAME)
    report.seconds = time.perf_counter() - started
    if report_path is not None:
        report.save(report_path)
    return FusionResult(out_path, report)


def finish_report(report: FusionReport, grams: LayerGrams | None, started: float) -> None:
    """Closing notes (what RegMean ran on; where rgsp's gamma put the result on the A -> B line), time, memory."""
    if grams is not None:
        report.calibration = {
            "source": grams.source,
            "samples": grams.samples,
            "tokens": grams.tokens,
            "seconds": grams.seconds,
        }
        report.notes.append(
            f"regmean: input Grams of {len(grams.streams)} models from {grams.samples} sample(s), {grams.tokens} "
            f"token(s) in all ({grams.source}; {grams.seconds:.1f} s)"
        )
    report.notes.extend(report.extrapolation_notes())
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = peak_rss_mb()


def _layer_grams(ckpts: list[Checkpoint], options: FuseOptions, report: FusionReport, progress: bool) -> LayerGrams:
    shapes = None
    if ckpts[0].model_type not in KNOWN:
        shapes = {k: ckpts[0].shape(k) for k in ckpts[0].keys()}
    arch = architecture_for(ckpts[0].config, shapes)
    report.notes.extend(arch.notes)
    return LayerGrams(ckpts, arch, options.regmean, progress=progress)


def _tensor_order(names: list[tuple[str, int]], grams: LayerGrams | None) -> list[tuple[str, int]]:
    """RegMean serves Grams layer by layer: decoder-layer tensors in layer order (others first)."""
    if grams is None:
        return names
    position = {name: i for i, (name, _) in enumerate(names)}

    def key(item: tuple[str, int]) -> tuple[int, int]:
        parsed = grams.arch.parse(item[0].rsplit(".", 1)[0])
        return (parsed[0] if parsed is not None else -1, position[item[0]])

    return sorted(names, key=key)


def _fuse_tensors(
    ckpts: list[Checkpoint],
    c: Checkpoint | None,
    options: FuseOptions,
    writer: ShardedWriter,
    report: FusionReport,
    progress: bool,
    grams: LayerGrams | None,
) -> None:
    a = ckpts[0]
    key_sets = [set(ckpt.keys()) for ckpt in ckpts]
    names: list[tuple[str, int]] = []
    claimed: set[str] = set()
    for index, ckpt in enumerate(ckpts):  # A's tensors, then those first seen in B, model 3, ...
        for key in ckpt.keys():
            if key not in claimed:
                claimed.add(key)
                names.append((key, index))
    dtype_note = False
    bar = tqdm(
        _tensor_order(names, grams),
        desc=f"loraport fuse {options.method}",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    for name, owner in bar:
        t0 = time.perf_counter()
        holders = [i for i, keys in enumerate(key_sets) if name in keys]
        if owner > 0 or len(holders) == 1:
            tensor = ckpts[owner].get(name)
            who = role_name(owner)
            record = TensorRecord(name, tuple(tensor.shape), str(tensor.dtype), copied_action(owner))
            record.note = f"only in {who}" if len(holders) == 1 else f"not in A; copied from {who}"
        elif len(holders) < len(ckpts) or any(ckpts[i].shape(name) != a.shape(name) for i in holders):
            tensor = a.get(name)
            odd = [
                role_name(i) for i in range(1, len(ckpts)) if i not in holders or ckpts[i].shape(name) != a.shape(name)
            ]
            record = TensorRecord(
                name,
                tuple(tensor.shape),
                str(tensor.dtype),
                "copied_from_a",
                note=f"missing or other shape in {', '.join(odd)}",
            )
            if len(ckpts) == 2 and name in key_sets[1]:
                record.note = f"B has shape {ckpts[1].shape(name)}"
        else:
            weights = [ckpt.get(name) for ckpt in ckpts]
            if any(w.dtype != weights[0].dtype for w in weights) and not dtype_note:
                dtypes = ", ".join(str(w.dtype) for w in weights)
                report.notes.append(f"dtypes differ (e.g. {name}: {dtypes}); output uses A's")
                dtype_note = True
            tensor, record = _fuse_one(name, weights, c, options, grams)
        record.layer = layer_of(name)
        record.seconds = time.perf_counter() - t0
        report.records.append(record)
        writer.add(name, tensor)


def _fuse_one(
    name: str,
    weights: list[torch.Tensor],
    c: Checkpoint | None,
    options: FuseOptions,
    grams: LayerGrams | None,
) -> tuple[torch.Tensor, TensorRecord]:
    """One tensor present in every model with one shape: returns (output in A's dtype, record)."""
    W_A = weights[0]
    record = TensorRecord(name, tuple(W_A.shape), str(W_A.dtype), options.method)
    if not all(w.dtype.is_floating_point for w in weights):
        record.action = "copied_from_a"
        same = all(torch.equal(W_A, w.to(W_A.dtype)) for w in weights[1:])
        record.note = "not a floating tensor" + ("" if same else "; differs in another model")
        return W_A, record
    norm_a = _norm(W_A)
    diff = max(_norm(w.float() - W_A.float()) for w in weights[1:])
    record.rel_diff = diff / norm_a if norm_a > 0 else None
    if options.keep_identical and all(w.dtype == W_A.dtype and torch.equal(W_A, w) for w in weights[1:]):
        record.action = "identical"
        return W_A, record
    W_C = None
    if options.needs_base:
        assert c is not None
        if name not in c or c.shape(name) != tuple(W_A.shape):
            record.action = "average"
            record.note = "not in base" if name not in c else f"base has shape {c.shape(name)}"
            return average(weights).to(W_A.dtype), record
        W_C = c.get(name)
    module = grams.module_of(name) if grams is not None else None
    if grams is not None and (module is None or not options.selected(name, W_A.ndim)):
        return _regmean_fallback(weights, W_C, options, record)
    if not options.selected(name, W_A.ndim):
        record.action = "average"
        return average(weights).to(W_A.dtype), record
    module_grams = None
    if grams is not None:
        assert module is not None
        module_grams = grams.get(*module)
        if grams.arch.transposed:  # Conv1D stores (in, out): RegMean works in Linear layout
            weights = [w.mT for w in weights]
    merged, fields = merge_tensor(options, *weights, base=W_C, grams=module_grams, name=name)
    if grams is not None and grams.arch.transposed:
        merged = merged.mT
    for key, value in fields.items():
        setattr(record, key, value)
    if not torch.isfinite(merged).all() and all(torch.isfinite(w).all() for w in weights):
        raise FusionError(f"tensor {name!r}: {options.method} produced non-finite values from finite inputs")
    return merged.to(W_A.dtype), record


def _regmean_fallback(
    weights: list[torch.Tensor], W_C: torch.Tensor | None, options: FuseOptions, record: TensorRecord
) -> tuple[torch.Tensor, TensorRecord]:
    """A tensor RegMean does not merge (not a decoder layer's linear weight, or not selected): its fallback."""
    if options.regmean.fallback == "task_arithmetic" and W_C is not None:
        merged = task_arithmetic(weights, W_C, options.scaling)
        record.action = "task_arithmetic"
    else:
        merged = average(weights)
        record.action = "average"
    record.note = "regmean fallback: not a selected linear layer of a decoder layer"
    if len(weights) == 2:
        record.position = position_on_line(weights[0], weights[1], merged)
    return merged.to(weights[0].dtype), record
