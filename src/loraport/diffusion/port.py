"""Port an image-model LoRA (kohya, diffusers or per-component PEFT) between Stable Diffusion bases.

The same unit loop as for LLM adapters (the port core, :func:`loraport.port.run_units`): every
module is paired by name (:class:`~loraport.diffusion.pairing.DiffusionPairing`), its base weights
(conv weights flattened to ``(out, in * kh * kw)``) give the subspaces, the chosen method
maps the factors, :func:`~loraport.port.assemble_modules` re-factorises them, and the
writer restores each module's layout from the *target* weight (a 1x1 conv in SD-1.x, a
linear layer in SDXL).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..adapters import LoraAdapter
from ..calibrate import CALIBRATED
from ..errors import LoraportError, TransferError
from ..io import atomic_file, check_output_dir, check_output_file
from ..methods import get_method
from ..port import (
    TransferOptions,
    TransferResult,
    assemble_modules,
    check_written,
    finish_report,
    new_report,
    port_units,
    write_port_dir,
)
from .bases import DiffusionBase
from .formats import (
    DiffusionLora,
    default_file_name,
    read_diffusion_lora,
    write_diffusers,
    write_kohya,
    write_peft_components,
)
from .pairing import DiffusionPairing


def _open(base: str | os.PathLike[str] | DiffusionBase) -> DiffusionBase:
    return base if isinstance(base, DiffusionBase) else DiffusionBase.open(base)


def check_out(
    out: str | os.PathLike[str] | None, fmt: str, overwrite: bool, error: type[LoraportError] = TransferError
) -> bool:
    """Check ``out`` before any work (a port's, or a fusion's with ``error=FusionError``); is it a single file?"""
    if out is None:
        return False
    if str(out).endswith(".safetensors"):
        if fmt == "peft":
            raise error(f"{out}: --out-format peft writes a directory (one adapter per component), not a file")
        check_output_file(out, overwrite)
        return True
    check_output_dir(out, overwrite)
    return False


def write_port(
    path: Path,
    fmt: str,
    adapter: LoraAdapter,
    lora: DiffusionLora,
    target: DiffusionBase | None,
    provenance: dict[str, str],
) -> None:
    """Write ``adapter`` in format ``fmt`` to ``path`` (a file for kohya / diffusers, a directory for peft).

    ``target`` names kohya and PEFT modules; without it the modules must carry kohya names
    already (kohya LoRAs read without a base) and only ``kohya`` can be written.
    """
    if fmt == "kohya":
        unet_names = lora.unet_names if lora.format == "kohya" else None
        if unet_names is None:  # sd-scripts names SDXL-class UNets (two text encoders) the sgm way
            unet_names = "sgm" if target is not None and "text_encoder_2" in target.components else "diffusers"
        write_kohya(path, adapter.modules, target, unet_names, lora.metadata, provenance, adapter.dtype)
    elif fmt == "diffusers":
        write_diffusers(path, adapter.modules, lora.metadata, provenance, adapter.dtype)
    else:
        if target is None:
            raise TransferError("writing per-component PEFT adapters needs the base model")
        write_peft_components(path, adapter.modules, target, adapter.dtype)


def transfer_diffusion(
    adapter: str | os.PathLike[str] | DiffusionLora,
    source_base: str | os.PathLike[str] | DiffusionBase,
    target_base: str | os.PathLike[str] | DiffusionBase,
    out: str | os.PathLike[str] | None = None,
    options: TransferOptions | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    started: float | None = None,
    extra_files: dict[str, str] | None = None,
) -> TransferResult:
    """Port a diffusion LoRA from ``source_base`` to ``target_base`` (what :func:`loraport.transfer` calls for one).

    Args:
        adapter: a kohya or diffusers ``.safetensors`` file, a directory holding one (or
            per-component PEFT directories), or a :class:`DiffusionLora`.
        source_base / target_base: diffusers folders, single-file ``.safetensors`` checkpoints or hub ids.
        out: a ``.safetensors`` file (kohya, diffusers) or a directory (the weights file, or
            one PEFT directory per component, plus ``loraport_report.json``); written atomically.
        options: as for :func:`loraport.transfer`; ``options.out_format`` picks the output
            format (default: the input's). ``calibrated`` and ``layer_map`` do not apply.
        extra_files: text files (name -> content) written into a directory ``out`` with the port.

    Returns:
        A :class:`~loraport.port.TransferResult` whose adapter's modules are named
        ``<component>.<diffusers module>``.
    """
    started = time.perf_counter() if started is None else started
    options = options or TransferOptions()
    options.validate()
    if options.method == CALIBRATED:
        raise TransferError("calibrated transfer needs text activations of a language model; not for diffusion LoRAs")
    if options.out_format == "gguf":
        raise TransferError("--out-format gguf writes llama.cpp LoRAs of language models; not for diffusion LoRAs")
    if options.layer_map is not None:
        raise TransferError("--layer-map pairs decoder layers; diffusion modules are paired by name")
    src, tgt = _open(source_base), _open(target_base)
    lora = (
        adapter
        if isinstance(adapter, DiffusionLora)
        else read_diffusion_lora(adapter, src, drop_unsupported=options.drop_unsupported)
    )
    fmt = options.out_format or lora.format
    single_file = check_out(out, fmt, overwrite)
    if single_file and extra_files:
        raise TransferError(f"{out}: extra files need a directory --out, not a .safetensors file")
    method = get_method(options.method)
    pairing = DiffusionPairing(lora.adapter, src, tgt)
    report = new_report(options, src.name, tgt.name, lora.adapter)
    style = f", {lora.unet_names}-style UNet names" if lora.format == "kohya" else ""
    report.notes.append(f"image-model LoRA read as {lora.format}{style}; written as {fmt}; modules paired by name")
    report.notes += pairing.notes()
    parts = port_units(pairing.units, method, options, report, progress)
    report.records += pairing.unpaired
    modules = assemble_modules(parts)
    check_written(report, modules, started, report_path)
    ported = LoraAdapter(modules=modules, config={"format": fmt}, dtype=lora.adapter.dtype)
    provenance = _provenance(src, tgt, options)
    written: Path | None = None
    if out is not None:
        report.output = str(out)
        if single_file:
            with atomic_file(out, overwrite=overwrite) as tmp:
                write_port(tmp, fmt, ported, lora, tgt, provenance)
            written = Path(out)
        else:

            def write(tmp: Path) -> None:
                write_port(tmp if fmt == "peft" else tmp / default_file_name(fmt), fmt, ported, lora, tgt, provenance)

            written = write_port_dir(out, overwrite, report, write, extra_files)
    finish_report(report, started, report_path)
    return TransferResult(ported, report, written)


def _provenance(src: DiffusionBase, tgt: DiffusionBase, options: TransferOptions) -> dict[str, Any]:
    from ..version import __version__

    return {
        "loraport_version": __version__,
        "loraport_method": options.method,
        "loraport_source_base": src.name,
        "loraport_target_base": tgt.name,
    }
