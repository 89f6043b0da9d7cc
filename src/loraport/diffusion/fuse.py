"""Fuse image-model LoRAs (kohya, diffusers, per-component PEFT) of one Stable Diffusion base.

The inputs are read into :class:`~loraport.adapters.LoraAdapter` modules named
``<component>.<diffusers module>`` (kohya names resolved against ``base``), fused module by
module with :func:`loraport.fusion.lora.merge_adapters` (the Core Space math of LLM adapters;
conv modules keep their kernel), and written in the first input's format or ``out_format``.

Without ``base``, kohya inputs keep their kohya names (``lora_unet_down_blocks_0_...``): LoRAs
of one base name their modules alike, so they fuse by name and are written back as kohya.
Mixing kohya with another format, or writing another format from kohya inputs, needs
``base`` to resolve the names. ``regmean`` needs a language model's activations: refused.

Example::

    >>> result = fuse_diffusion(["style.safetensors", "subject.safetensors"], "both.safetensors",
    ...                         method="task_arithmetic")      # doctest: +SKIP
    >>> fuse_diffusion(["a.safetensors", "b_diffusers/"], "ab", base="runs/sd15", out_format="diffusers",
    ...                method="ties", density=0.5)               # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapters import LoraAdapter
from ..fusion.lora import ADAPTER_REPORT_NAME, merge_adapters
from ..fusion.models import FusionResult, finish_report
from ..fusion.options import FuseOptions, FusionError, resolve_options
from ..fusion.registry import FUSION_METHODS
from ..fusion.report import FusionReport
from ..io import atomic_directory, atomic_file
from .bases import DiffusionBase
from .formats import FORMATS, DiffusionLora, default_file_name, detect_format, read_diffusion_lora
from .port import check_out, write_port

DiffusionLoraRef = str | os.PathLike[str] | DiffusionLora


def _read(ref: DiffusionLoraRef, base: DiffusionBase | None) -> DiffusionLora:
    if isinstance(ref, DiffusionLora):
        return ref
    if detect_format(ref) is None:
        raise FusionError(
            f"{ref}: not an image-model LoRA (kohya, diffusers or per-component PEFT): "
            "pass only image-model LoRAs, or only PEFT adapters of a language model"
        )
    return read_diffusion_lora(ref, base)


def _check_formats(loras: list[DiffusionLora], names: list[str], fmt: str, base: DiffusionBase | None) -> None:
    """Kohya names resolve only against a base: mixed formats, or another output format, need one."""
    if base is not None:
        return
    kohya = [i for i, lora in enumerate(loras) if lora.format == "kohya"]
    if kohya and len(kohya) < len(loras):
        other = next(i for i in range(len(loras)) if i not in kohya)
        raise FusionError(
            f"{names[kohya[0]]} is a kohya LoRA and {names[other]} a {loras[other].format} one: mixing formats "
            "needs --base (the Stable Diffusion model they were trained on) to resolve kohya names"
        )
    if kohya and fmt != "kohya":
        raise FusionError(f"writing kohya inputs as {fmt} needs --base (the model they were trained on)")
    if fmt == "peft" and not kohya:
        raise FusionError("--out-format peft names modules as the base's files do: it needs --base")


def fuse_diffusion(
    loras: Sequence[DiffusionLoraRef],
    out: str | os.PathLike[str] | None = None,
    *,
    base: str | os.PathLike[str] | DiffusionBase | None = None,
    rank: int | None = None,
    out_format: str | None = None,
    options: FuseOptions | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> FusionResult:
    """Fuse ``N >= 2`` image-model LoRAs trained on one Stable Diffusion base.

    Args:
        loras: kohya or diffusers ``.safetensors`` files, directories holding one, per-component
            PEFT directories, or :class:`~loraport.diffusion.DiffusionLora` objects.
        out: a ``.safetensors`` file (kohya, diffusers) or a directory (the weights file and
            ``loraport_fusion_report.json``), written atomically; ``None``: in memory only.
        base: the base they were trained on (diffusers folder or single file); needed to mix
            kohya with other formats and to write kohya inputs in another format.
        rank: maximum rank of each fused module (default: the sum of the inputs' ranks).
        out_format: ``kohya``, ``diffusers`` or ``peft`` (default: the first input's format).
        options, overrides: as for :func:`loraport.fusion.fuse_adapters` (``method="ties"``, ...).

    Returns:
        A :class:`~loraport.fusion.FusionResult` whose ``adapter`` holds the fused modules.
    """
    started = time.perf_counter()
    chosen = FUSION_METHODS.get(overrides.get("method", options.method if options is not None else ""))
    if chosen is not None and chosen.calibrated:  # before the options ask for its calibration text
        raise FusionError(f"{chosen.name} needs a language model's activations; not for image-model LoRAs")
    options = resolve_options(options, overrides, kind="image")
    if len(loras) < 2:
        raise FusionError(f"fusion needs at least two LoRAs, got {len(loras)}")
    if options.info.max_models is not None and len(loras) > options.info.max_models:
        raise FusionError(f"{options.method} is defined for {options.info.max_models} adapters, got {len(loras)}")
    if out_format is not None and out_format not in FORMATS:
        raise FusionError(f"unknown --out-format {out_format!r} (choose from {', '.join(FORMATS)})")
    if rank is not None and rank < 1:
        raise FusionError(f"output rank must be >= 1, got {rank}")
    opened = base if isinstance(base, DiffusionBase) or base is None else DiffusionBase.open(base)
    try:
        read = [_read(ref, opened) for ref in loras]
        names = [str(lora.path) if lora.path else f"<lora {i + 1}>" for i, lora in enumerate(read)]
        fmt = out_format or read[0].format
        _check_formats(read, names, fmt, opened)
        single_file = check_out(out, fmt, overwrite, FusionError)
        report = FusionReport(
            method=options.method,
            inputs=names,
            base=opened.name if opened is not None else None,
            options={**options.to_dict(), "output_rank": rank},
            kind="adapter",
        )
        formats = ", ".join(dict.fromkeys(lora.format for lora in read))
        report.notes.append(f"image-model LoRAs read as {formats}; written as {fmt}")
        modules = merge_adapters([lora.adapter for lora in read], names, options, report, rank=rank, progress=progress)
        fused = LoraAdapter(modules=modules, config={"format": fmt}, dtype=read[0].adapter.dtype)
        finish_report(report, None, started)
        written = None if out is None else _write(out, single_file, fmt, fused, read[0], opened, report, overwrite)
    finally:
        if opened is not None and opened is not base:
            opened.close()
    if report_path is not None:
        report.save(report_path)
    return FusionResult(written, report, fused)


def _write(
    out: str | os.PathLike[str],
    single_file: bool,
    fmt: str,
    fused: LoraAdapter,
    first: DiffusionLora,
    base: DiffusionBase | None,
    report: FusionReport,
    overwrite: bool,
) -> Path:
    from ..version import __version__

    provenance = {
        "loraport_version": __version__,
        "loraport_fusion_method": report.method,
        "loraport_fused": ", ".join(Path(name).name for name in report.inputs),
    }
    report.output = str(out)
    if single_file:
        with atomic_file(out, overwrite=overwrite) as tmp:
            write_port(tmp, fmt, fused, first, base, provenance)
        return Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_port(tmp if fmt == "peft" else tmp / default_file_name(fmt), fmt, fused, first, base, provenance)
        report.save(tmp / ADAPTER_REPORT_NAME)
    return Path(out)


__all__ = ["fuse_diffusion"]
