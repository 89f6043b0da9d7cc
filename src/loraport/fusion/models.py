"""Fuse two fine-tuned models tensor by tensor into a new model directory (SPEC sec. 7).

:func:`fuse` opens A and B (and the base C for task-vector methods) lazily with
:class:`~loraport.checkpoints.Checkpoint`, checks they share an architecture, and processes
**one tensor at a time**: selected tensors (by default every 2-D weight except embeddings
and the output head) go through the method, other floating tensors are averaged, tensors
that are bit-identical in A and B are copied. The result is written as sharded safetensors
into an atomic output directory, in A's dtype per tensor, with ``config.json``,
``generation_config.json`` and the tokenizer files copied from A, plus a per-tensor report.

Example::

    >>> result = fuse("runs/model-a", "runs/model-b", "runs/fused", method="rgsp")  # doctest: +SKIP
    >>> print(result.report.summary())                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import CONFIG_NAME as ADAPTER_CONFIG
from ..checkpoints import Checkpoint
from ..io import atomic_directory, check_output_dir
from ..report import peak_rss_mb
from .baselines import average
from .methods import FuseOptions, FusionError, merge_tensor
from .report import FusionReport, TensorRecord, layer_of
from .writer import ShardedWriter

REPORT_NAME = "loraport_fusion_report.json"
# Non-weight files copied from model A: configs and every common tokenizer file.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
)


@dataclass
class FusionResult:
    """The written directory (``None`` for in-memory adapter fusion) and the report."""

    output: Path | None
    report: FusionReport
    adapter: Any = None


def resolve_options(options: FuseOptions | None, overrides: dict[str, Any]) -> FuseOptions:
    """A validated copy of ``options`` with keyword ``overrides`` applied."""
    options = dataclasses.replace(options) if options is not None else FuseOptions()
    for name, value in overrides.items():
        if name.startswith("_") or not hasattr(options, name):
            raise TypeError(f"unknown fusion option {name!r}")
        setattr(options, name, value)
    options.validate()
    return options


def _open(model: str | os.PathLike[str] | Checkpoint, stack: ExitStack) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    if (Path(model) / ADAPTER_CONFIG).exists():
        raise FusionError(f"{model}: is a LoRA adapter directory (use fuse_adapters, or pass two adapters)")
    ckpt = Checkpoint.open(model)
    stack.callback(ckpt.close)
    return ckpt


def _check_pair(a: Checkpoint, b: Checkpoint, options: FuseOptions, report: FusionReport, role: str) -> None:
    """Same ``model_type``, tensor names and shapes, or a :class:`FusionError` naming the tensor."""
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
    if (only_a or only_b) and not allow and role == "B":
        first, where, missing = (only_a[0], a.name, b.name) if only_a else (only_b[0], b.name, a.name)
        raise FusionError(
            f"tensor {first!r} is in {where} but not in {missing} ({len(only_a)} tensor(s) only in A, "
            f"{len(only_b)} only in B): different architectures{hint}"
        )
    for key in a.keys():
        if key in keys_b and a.shape(key) != b.shape(key):
            message = f"tensor {key!r}: shape {a.shape(key)} in {a.name} but {b.shape(key)} in {role} {b.name}"
            if not allow:
                raise FusionError(f"shape mismatch: {message}{hint}")
            report.notes.append(message)


def _copy_side_files(source: Path, dest: Path) -> list[str]:
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in COPIED_FILES):
            shutil.copy2(path, dest / path.name)  # follows hub-cache symlinks
            copied.append(path.name)
    return copied


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.float()))


def fuse(
    model_a: str | os.PathLike[str] | Checkpoint,
    model_b: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | Checkpoint | None = None,
    options: FuseOptions | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> FusionResult:
    """Fuse models A and B into a new model directory ``out``.

    Args:
        model_a, model_b: model directories, hub ids or open checkpoints of one architecture.
        out: output directory, written atomically (nothing is left on failure; an existing
            directory needs ``overwrite=True``).
        base: the common base C, required by ``task_arithmetic`` and ``ties``.
        options: a :class:`FuseOptions`; keyword ``overrides`` set its fields
            (``method="ties"``, ``density=0.5``, ``rank=32``, ...).
        report_path: also write the report there (``.json`` + ``.md``); the output directory
            always gets ``loraport_fusion_report.json`` / ``.md``.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`FusionResult` with the output path and the :class:`FusionReport`.

    Raises:
        LoraportError: unreadable inputs, different architectures, shape mismatches,
            a task-vector method without a base, an existing ``out``.
    """
    started = time.perf_counter()
    options = resolve_options(options, overrides)
    info = options.info
    out_path = check_output_dir(out, overwrite)
    if info.needs_base and base is None:
        raise FusionError(f"method {options.method} needs the common base model C of A and B (--base)")
    with ExitStack() as stack:
        ckpt_a = _open(model_a, stack)
        ckpt_b = _open(model_b, stack)
        ckpt_c = _open(base, stack) if base is not None and info.needs_base else None
        report = FusionReport(
            method=options.method,
            inputs=[ckpt_a.name, ckpt_b.name],
            base=ckpt_c.name if ckpt_c is not None else None,
            options=options.to_dict(),
        )
        if base is not None and ckpt_c is None:
            report.notes.append(f"base {base} ignored: {options.method} does not use one")
        _check_pair(ckpt_a, ckpt_b, options, report, "B")
        if ckpt_c is not None:
            _check_pair(ckpt_a, ckpt_c, options, report, "base")
        with atomic_directory(out_path, overwrite=overwrite) as tmp:
            writer = ShardedWriter(tmp, options.shard_size)
            _fuse_tensors(ckpt_a, ckpt_b, ckpt_c, options, writer, report, progress)
            writer.close()
            copied = _copy_side_files(ckpt_a.root, tmp)
            if "config.json" not in copied:
                report.notes.append(f"{ckpt_a.name} has no config.json: the output is not loadable by transformers")
            report.output = str(out_path)
            report.seconds = time.perf_counter() - started
            report.peak_rss_mb = peak_rss_mb()
            report.save(tmp / REPORT_NAME)
    report.seconds = time.perf_counter() - started
    if report_path is not None:
        report.save(report_path)
    return FusionResult(out_path, report)


def _fuse_tensors(
    a: Checkpoint,
    b: Checkpoint,
    c: Checkpoint | None,
    options: FuseOptions,
    writer: ShardedWriter,
    report: FusionReport,
    progress: bool,
) -> None:
    keys_a, keys_b = set(a.keys()), set(b.keys())
    names = [(k, "a") for k in a.keys()] + [(k, "b") for k in b.keys() if k not in keys_a]
    dtype_note = False
    bar = tqdm(
        names,
        desc=f"loraport fuse {options.method}",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    for name, side in bar:
        t0 = time.perf_counter()
        if side == "b":
            tensor = b.get(name)
            record = TensorRecord(name, tuple(tensor.shape), str(tensor.dtype), "copied_from_b", note="only in B")
        elif name not in keys_b:
            tensor = a.get(name)
            record = TensorRecord(name, tuple(tensor.shape), str(tensor.dtype), "copied_from_a", note="only in A")
        elif a.shape(name) != b.shape(name):
            tensor = a.get(name)
            record = TensorRecord(
                name, tuple(tensor.shape), str(tensor.dtype), "copied_from_a", note=f"B has shape {b.shape(name)}"
            )
        else:
            W_A, W_B = a.get(name), b.get(name)
            if W_A.dtype != W_B.dtype and not dtype_note:
                report.notes.append(f"dtypes differ (e.g. {name}: {W_A.dtype} vs {W_B.dtype}); output uses A's")
                dtype_note = True
            tensor, record = _fuse_one(name, W_A, W_B, c, options)
        record.layer = layer_of(name)
        record.seconds = time.perf_counter() - t0
        report.records.append(record)
        writer.add(name, tensor)


def _fuse_one(
    name: str, W_A: torch.Tensor, W_B: torch.Tensor, c: Checkpoint | None, options: FuseOptions
) -> tuple[torch.Tensor, TensorRecord]:
    """One tensor present in both models with one shape: returns (output in A's dtype, record)."""
    record = TensorRecord(name, tuple(W_A.shape), str(W_A.dtype), options.method)
    if not W_A.dtype.is_floating_point or not W_B.dtype.is_floating_point:
        record.action = "copied_from_a"
        record.note = "not a floating tensor" + ("" if torch.equal(W_A, W_B.to(W_A.dtype)) else "; differs in B")
        return W_A, record
    norm_a = _norm(W_A)
    record.rel_diff = _norm(W_B.float() - W_A.float()) / norm_a if norm_a > 0 else None
    if options.keep_identical and W_A.dtype == W_B.dtype and torch.equal(W_A, W_B):
        record.action = "identical"
        return W_A, record
    if not options.selected(name, W_A.ndim):
        record.action = "average"
        return average([W_A, W_B]).to(W_A.dtype), record
    W_C = None
    if options.info.needs_base:
        assert c is not None
        if name not in c or c.shape(name) != tuple(W_A.shape):
            record.action = "average"
            record.note = "not in base" if name not in c else f"base has shape {c.shape(name)}"
            return average([W_A, W_B]).to(W_A.dtype), record
        W_C = c.get(name)
    merged, fields = merge_tensor(options, W_A, W_B, W_C)
    for key, value in fields.items():
        setattr(record, key, value)
    if not torch.isfinite(merged).all() and torch.isfinite(W_A).all() and torch.isfinite(W_B).all():
        raise FusionError(f"tensor {name!r}: {options.method} produced non-finite values from finite inputs")
    return merged.to(W_A.dtype), record
