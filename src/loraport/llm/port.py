"""Port a language-model LoRA (PEFT or GGUF) between causal-LM bases: pair by role, run the port core, write
PEFT or GGUF.

Base weights are read one tensor at a time (the next ones are read in a background thread
while the current one is decomposed), decomposed once, and cached on disk; only subspaces
(``U, S, V``) are kept in memory. ``calibrated`` refines the per-unit results on unlabeled
text (shared coordinates), or, across tokenizers, carries the adapter's effect through maps
between the two models' hidden states (``mapped``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from ..adapters import (
    GGUF_LORA_NAME,
    LoraAdapter,
    LoraModule,
    adapter_config_for,
    gguf_target,
    load_adapter,
    output_format,
    save_adapter,
    write_gguf_lora,
)
from ..calibrate import CALIBRATED, MappedCalibrator, calibrate, choose_mode, unrelated_reason
from ..checkpoints import Checkpoint
from ..distill import DISTILL, Distiller
from ..errors import TransferError
from ..io import atomic_file, check_output_dir, check_output_file
from ..pairing import Pairing
from ..port import (
    TransferOptions,
    TransferResult,
    assemble_modules,
    check_written,
    finish_report,
    new_report,
    port_method,
    port_units,
    write_port_dir,
)

log = logging.getLogger(__name__)


def transfer_llm(
    adapter: str | os.PathLike[str] | LoraAdapter,
    source_base: str | os.PathLike[str] | Checkpoint,
    target_base: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str] | None,
    options: TransferOptions,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    started: float | None = None,
    extra_files: dict[str, str] | None = None,
) -> TransferResult:
    """Port a PEFT or GGUF LoRA between language models (what :func:`loraport.transfer` calls for one).

    Arguments as for :func:`loraport.transfer`; ``options`` are validated by the caller. The
    output format is ``options.out_format``, else ``gguf`` for an ``out`` ending in ``.gguf``,
    else the input's; a GGUF output needs a GGUF target base (its names, architecture and row
    order) and is one file (``out`` ending in ``.gguf``) or a directory holding
    ``adapter.gguf`` and the report.
    """
    started = time.perf_counter() if started is None else started
    fmt = output_format(options.out_format, adapter, out)
    single_file = out is not None and str(out).endswith(".gguf")
    if single_file:
        if extra_files:
            raise TransferError(f"{out}: extra files need a directory --out, not a .gguf file")
        check_output_file(out, overwrite)
    elif out is not None:
        check_output_dir(out, overwrite)
    src = source_base if isinstance(source_base, Checkpoint) else Checkpoint.open(source_base)
    tgt = target_base if isinstance(target_base, Checkpoint) else Checkpoint.open(target_base)
    gguf_base = gguf_target(tgt) if fmt == "gguf" else None
    if not isinstance(adapter, LoraAdapter):
        adapter = load_adapter(adapter, drop_unsupported=options.drop_unsupported, base=src)
    pairing = Pairing(adapter, src, tgt, options.layer_map)
    options, auto_notes = _auto_method(options, pairing)
    calibrated = options.method == CALIBRATED
    method = port_method(options)

    report = new_report(options, src.name, tgt.name, adapter)
    report.notes += auto_notes
    report.layer_map = pairing.layer_map
    report.notes += pairing.arch_s.notes + pairing.arch_t.notes

    mode = None
    if calibrated:
        mode, notes = choose_mode(options.calibrated, pairing)
        report.notes += notes
    # Distillation trains a new LoRA on the target: it pairs no layers, by depth or otherwise.
    pairs_by_depth = options.layer_map is None and mode != "mapped" and options.method != DISTILL
    if pairing.layers_s != pairing.layers_t and pairs_by_depth:
        report.notes.append(
            f"depths differ ({pairing.layers_s} -> {pairing.layers_t}): layers paired by relative depth"
        )
    if mode == "mapped":
        # The adapter's effect goes to the target's residual writers: no per-module init to compute.
        parts = MappedCalibrator(pairing, adapter, options.calibrated, report, progress, options.device).run()
    elif options.method == DISTILL:
        # Only the start port distillation uses is computed: none from zero; with auto, the copy where shapes
        # match (elsewhere the start is the target itself); else the named closed-form port of every unit.
        init = options.calibrated.init
        units = [] if init == "zero" else pairing.units
        if init == "auto":
            units = [unit for unit in units if unit.source.shape == unit.target.shape]
        distiller = Distiller(pairing, adapter, options.distill, options.calibrated, report, progress, options.device)
        with distiller.phases("start port"):
            parts = port_units(units, method, options, report, progress) if units else []
        parts = distiller.run(parts, assemble_modules(parts))
        if distiller.refusal is not None:  # it learned nothing: say why, in one line, and write nothing
            check_written(report, {}, started, report_path, why=distiller.refusal)
    else:
        parts = port_units(pairing.units, method, options, report, progress)
        if calibrated:
            parts = calibrate(parts, pairing, adapter, options.calibrated, report, progress, options.device)
    if mode != "mapped":  # mapped carries every source layer's effect through the residual stream
        report.records += pairing.unpaired

    modules = assemble_modules(parts)
    target_adapter = LoraAdapter(modules=modules, config=dict(adapter.config), dtype=adapter.dtype)
    check_written(report, modules, started, report_path)
    config = adapter_config_for(
        target_adapter, tgt.name, _target_modules_field(modules, pairing), fan_in_fan_out=pairing.arch_t.transposed
    )
    target_adapter.config = config
    written: Path | None = None
    writing = time.perf_counter()
    if out is not None and gguf_base is not None:
        provenance = _provenance(src, tgt, options)
        if single_file:
            report.output = str(out)
            with atomic_file(out, overwrite=overwrite) as tmp:
                write_gguf_lora(target_adapter, tmp, gguf_base, provenance=provenance)
            written = Path(out)
        else:

            def write(tmp: Path) -> None:
                write_gguf_lora(target_adapter, tmp / GGUF_LORA_NAME, gguf_base, provenance=provenance)

            written = write_port_dir(out, overwrite, report, write, extra_files)
    elif out is not None:
        written = write_port_dir(
            out, overwrite, report, lambda tmp: save_adapter(target_adapter, tmp, config=config), extra_files
        )
    if report.distill is not None and "timings" in report.distill:
        report.distill["timings"]["write"] = round(time.perf_counter() - writing, 2)
    finish_report(report, started, report_path)
    return TransferResult(target_adapter, report, written)


def _auto_method(options: TransferOptions, pairing: Pairing) -> tuple[TransferOptions, list[str]]:
    """``auto`` on a target unrelated to the source: ``distill`` when prompts are given, else a loud warning."""
    if options.method != "auto":
        return options, []
    reason = unrelated_reason(pairing)
    if reason is None:
        return options, []
    if options.distill.prompts is not None:
        options = replace(options, method=DISTILL)
        options.validate()
        return options, [f"auto: {reason}, so the port is distilled (the only method that carries an adapter across "
                         "model families) from the given --prompts"]  # fmt: skip
    warning = (
        f"WARNING: {reason}: closed-form ports carry little across model families (at most 9% of the gain from "
        "SmolLM2 to Gemma-3 in our measurements); only --method distill carries an adapter there: pass --prompts FILE "
        "(the task's inputs, no labels), e.g. loraport transfer ... --method distill --prompts inputs.jsonl"
    )
    log.warning(warning)
    return options, [warning]


def _provenance(src: Checkpoint, tgt: Checkpoint, options: TransferOptions) -> dict[str, str]:
    from ..version import __version__

    return {"version": __version__, "method": options.method, "source_base": src.name, "target_base": tgt.name}


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


__all__ = ["transfer_llm"]
