"""Fuse LoRA adapters by distillation: every adapter a teacher on its own prompts, one student on the target.

Weight-space merging keeps content skills but loses an adapter that fights the others over the
same output (a format adapter), and it cannot merge adapters of different bases at all. Here
each adapter, on its own base, teaches its behaviour on its own prompts and one LoRA on the
chosen target learns them all (:mod:`loraport.distill.multi`). Where the adapters share the
target's base the student starts from their weight-space merge (the adapters' default method),
and ``method="auto"`` first scores several weight-space merges by held-out agreement with each
teacher (no training) and writes the best by the worst task when it reaches ``min_kept``,
distilling from it otherwise.

Example::

    >>> fuse_distilled(["lora-facts", "lora-json"], "fused", bases=["smollm2"],          # doctest: +SKIP
    ...                prompts=["facts.jsonl", "json.jsonl"])
    >>> fuse_distilled(["smol-facts", "gemma-bins"], "gemma-both", bases=["smollm2", "gemma3"],  # doctest: +SKIP
    ...                prompts=["facts.jsonl", "bins.jsonl"], target_base="gemma3")
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapters import LoraAdapter, adapter_config_for, gguf_target, load_adapter, output_format
from ..checkpoints import Checkpoint
from ..distill.bound import SIDE_EFFECT_MARGIN, bound_note
from ..distill.multi import MultiDistiller, Teacher, check_teacher_counts
from ..distill.options import DistillOptions
from ..distill.teacher import checkpoint_digest
from ..errors import LoraportError, TransferError
from ..io import check_output_dir, check_output_file
from ..pairing import Pairing
from .lora import merge_adapters, write_fused_adapter
from .models import FusionResult
from .options import DEFAULTS, FuseOptions, FusionError, resolve_options
from .report import FusionReport

# --method auto with prompts: the weight-space merges scored before any training (method, scaling)
CANDIDATES: tuple[tuple[str, float], ...] = (("iso_c", 1.5), ("ties", 1.0), ("tsv", 1.0), ("task_arithmetic", 1.0))
# the worst task's held-out agreement a weight-space merge needs to be written without distilling
DEFAULT_MIN_KEPT = 0.9


def _open(ref: Any) -> Checkpoint:
    return ref if isinstance(ref, Checkpoint) else Checkpoint.open(ref)


def _same_base(a: Checkpoint, b: Checkpoint) -> bool:
    return a.root == b.root or checkpoint_digest(a) == checkpoint_digest(b)


def _weight_space(
    adapters: list[LoraAdapter], names: list[str], method: str, scaling: float, rank: int | None
) -> dict[str, Any]:
    options = resolve_options(FuseOptions(method=method, scaling=scaling), {}, kind="adapter")
    report = FusionReport(method=method, inputs=names, base=None, options={}, kind="adapter")
    return merge_adapters(adapters, names, options, report, rank=rank, progress=False)


def fuse_distilled(
    adapters: Sequence[str | os.PathLike[str] | LoraAdapter],
    out: str | os.PathLike[str] | None,
    *,
    bases: Sequence[Any],
    prompts: Sequence[Any],
    target_base: Any = None,
    synthesize: int | Sequence[int] = 0,
    rank: int | None = None,
    method: str = "distill",
    min_kept: float = DEFAULT_MIN_KEPT,
    distill: DistillOptions | None = None,
    generic_text: str | None = None,
    out_format: str | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> FusionResult:
    """Fuse ``N >= 2`` LoRA adapters into one adapter for ``target_base`` by multi-teacher distillation.

    Args:
        adapters: PEFT directories or GGUF LoRAs (or loaded adapters).
        out: the fused adapter (a directory, or a ``.gguf`` file), written atomically; ``None``: in memory.
        bases: the base each adapter was trained on (one for all, or one per adapter).
        prompts: each adapter's task inputs, no labels (the kinds ``transfer --prompts`` reads).
        target_base: the base of the fused adapter (default: the adapters' shared base).
        synthesize: the teacher writes this many more prompts (one number, or one per adapter).
        rank: the student's rank (default: the sum of the adapters' ranks).
        method: ``distill``, or ``auto``: score weight-space merges first and distill only when none keeps
            ``min_kept`` held-out agreement with every teacher (needs the adapters to share the target's base).
        distill: the distillation settings (``prompts`` and ``synthesize`` are per adapter, above).
        generic_text: text whose target-base predictions the student keeps (default: standard-library docstrings).

    Raises:
        LoraportError: mismatched counts, an adapter that does not fit its base, no shared base without
            ``target_base``, a fusion that learned nothing (one-line messages; nothing written).
    """
    started = time.perf_counter()
    options = dataclasses.replace(distill) if distill is not None else DistillOptions()
    if method not in ("distill", "auto"):
        raise FusionError(f"fuse_distilled: method must be distill or auto, got {method!r}")
    counts = check_teacher_counts(len(adapters), len(bases), len(prompts), synthesize)
    if out is not None:
        (check_output_file if str(out).endswith(".gguf") else check_output_dir)(out, overwrite)
    fmt = output_format(out_format, adapters[0], out)
    sources = [_open(b) for b in (list(bases) * len(adapters) if len(bases) == 1 else bases)]
    if target_base is None:
        if not all(_same_base(s, sources[0]) for s in sources):
            raise TransferError("the adapters were trained on different bases: pass --target-base (the fused "
                                "adapter's base)")  # fmt: skip
        target = sources[0]
    else:
        target = _open(target_base)
    gguf_base = gguf_target(target) if fmt == "gguf" else None
    loaded = [
        a if isinstance(a, LoraAdapter) else load_adapter(a, base=s) for a, s in zip(adapters, sources, strict=True)
    ]
    names = [str(a.path) if a.path else f"adapter {i + 1}" for i, a in enumerate(loaded)]
    for adapter, source, name in zip(loaded, sources, names, strict=True):
        try:
            Pairing(adapter, source, target, None)
        except LoraportError as exc:
            raise TransferError(f"{name}: {exc}") from None
    for given in prompts:  # every shared setting, and each teacher's prompts, checked before any work
        dataclasses.replace(options, prompts=given).validate()
    teachers = [Teacher(a, s, p, n, c) for a, s, p, n, c in zip(loaded, sources, prompts, names, counts, strict=True)]

    shared = all(_same_base(s, target) for s in sources)
    report = FusionReport(method=method, inputs=names, base=target.name,
                          options={"distill": {k: str(v) for k, v in vars(options).items()}, "rank": rank,
                                   "min_kept": min_kept if method == "auto" else None}, kind="adapter")  # fmt: skip
    init: dict[str, Any] = {}
    candidates = None
    if options.learn == "coefficients":
        if not shared:
            raise TransferError(
                "--distill-learn coefficients weights the adapters' own factors: every adapter must be of the "
                "target's base (use the default, --distill-learn lora, across bases)"
            )
        if method == "auto":
            raise TransferError("--distill-learn coefficients is a --method distill setting, not --method auto")
        report.notes.append("start: the adapters side by side, every layer's coefficients 1 (task arithmetic); "
                            "only the coefficients are learnt")  # fmt: skip
    elif shared:
        start_method, start_scaling = DEFAULTS["adapter"]
        try:
            if method == "auto":
                candidates = {f"{m} x{s:g}": _weight_space(loaded, names, m, s, rank) for m, s in CANDIDATES}
            else:
                init = _weight_space(loaded, names, start_method, start_scaling, rank)
                report.notes.append(f"start: the weight-space merge {start_method} x{start_scaling:g} (the adapters "
                                    "share the target's base)")  # fmt: skip
        except FusionError as exc:  # e.g. adapters of disjoint modules: nothing to merge in weight space
            report.notes.append(f"start: the target itself (no weight-space merge: {exc})")
    elif method == "auto":
        report.notes.append("auto: the adapters do not all share the target's base, so no weight-space merge is "
                            "possible: distilled from the target itself")  # fmt: skip
    distiller = MultiDistiller(teachers, target, options, generic_text, rank, progress, device)
    modules, info = distiller.run(init, candidates, min_kept if method == "auto" else None)
    report.distill = info
    report.notes += _notes(info)
    if modules is None:
        report.seconds = time.perf_counter() - started
        if report_path is not None:
            report.save(report_path)
        raise TransferError(info.get("refusal", "distill: nothing to write"))
    config = copy.deepcopy(loaded[0].config)
    fused = LoraAdapter(modules=modules, config=config, dtype=loaded[0].dtype)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    fused.config = adapter_config_for(fused, target.name, leaves, False)
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = info.get("peak_rss_mb")
    provenance = {"fusion_method": f"distill ({info.get('chosen')})", "inputs": ", ".join(names)}
    written = write_fused_adapter(fused, out, overwrite, gguf_base, report, provenance)
    if report_path is not None:
        report.save(report_path)
    return FusionResult(written, report, fused)


def _notes(info: dict[str, Any]) -> list[str]:
    notes = []
    candidates = info.get("candidates")
    if candidates:
        rows = "; ".join(f"{name}: worst {row['worst']:.3f}" for name, row in candidates["table"].items())
        notes.append(
            f"auto: weight-space merges by the worst task's held-out agreement: {rows}; best {candidates['best']}"
        )
    for task in info.get("tasks", []):
        notes.append(
            f"distill: {task['task']}: held-out agreement with its teacher {task['start']['agreement']:.3f} (start) "
            f"-> {task['distilled']['agreement']:.3f} (distilled)" + (" WORSE" if task["worse"] else "")
        )
    generic = info.get("generic")
    if generic:
        own = ", ".join(f"{Path(n).name} {v:+.1%}" for n, v in generic["source_perplexity_changes"].items()
                        if v is not None)  # fmt: skip
        change = generic["perplexity_change"]
        notes.append(f"distill: perplexity on generic text ({generic['text']}): the fused adapter changes the "
                     f"target's by {change:+.1%}; each adapter its own base's: {own}")  # fmt: skip
        if generic.get("bound"):
            notes.append(bound_note(generic["bound"], "the adapters' largest own change"))
        owns = [v for v in generic["source_perplexity_changes"].values() if v is not None]
        if owns and change > max(*owns, 0.0) + SIDE_EFFECT_MARGIN:
            notes.append(
                f"WARNING: the fused adapter raises the target's generic perplexity by {change:+.1%}, more than any "
                f"adapter changes its own base's (at most {max(owns):+.1%}): it changes the target elsewhere more than "
                "its inputs do (--distill-keep-weight, --distill-keep-bound, --calibration with generic text)"
            )
    notes.append(f"chosen: {info.get('chosen')}")
    if any(t["worse"] for t in info.get("tasks", [])) and info.get("chosen") != "distilled":
        notes.append("WARNING: distilling made some task worse than the start merge: the start merge was written")
    return notes


__all__ = ["CANDIDATES", "DEFAULT_MIN_KEPT", "fuse_distilled"]
