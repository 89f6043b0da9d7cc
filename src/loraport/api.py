"""The library's entry points that dispatch by input kind: :func:`transfer` and :func:`fuse`.

Language-model adapters (PEFT) go to :mod:`loraport.llm`, image-model LoRAs (kohya, diffusers,
per-component PEFT) to :mod:`loraport.diffusion`; both build on the port core
(:mod:`loraport.port`). :func:`fuse` sends fine-tuned models and PEFT adapters to
:mod:`loraport.fusion`, image-model LoRAs to :func:`loraport.diffusion.fuse.fuse_diffusion`.
:func:`fuse_from_args` runs a parsed ``fuse`` command line (``loraport fuse``, and the
``fuse:`` jobs of ``loraport batch``, which check theirs up front with :func:`check_fuse_args`).
Nothing below this module imports a front.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .adapters import CONFIG_NAME, LoraAdapter, is_gguf_lora
from .checkpoints import Checkpoint
from .errors import LoraportError
from .fusion import FuseOptions, FusionError, FusionResult
from .port import TransferOptions, TransferResult


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
    from .llm import transfer_llm

    return transfer_llm(
        adapter, source_base, target_base, out, options, report_path, overwrite, progress, started, extra_files
    )


def input_kind(ref: Any) -> str:
    """``adapter`` (PEFT or GGUF LoRA of a language model), ``image`` (kohya, diffusers, per-component PEFT
    LoRA) or ``model`` (a model directory, hub id or open checkpoint)."""
    if isinstance(ref, LoraAdapter):
        return "adapter"
    if isinstance(ref, Checkpoint):
        return "model"
    from .diffusion.formats import DiffusionLora, detect_format

    if isinstance(ref, DiffusionLora):
        return "image"
    path = Path(ref)
    if (path / CONFIG_NAME).is_file() or is_gguf_lora(path):
        return "adapter"
    if (path / "config.json").is_file() or not path.exists():
        return "model"
    return "image" if detect_format(path) is not None else "model"


DISTILL_ONLY = "--prompts, --bases and --target-base are for --method distill (or auto with --prompts)"


def _distill_bases(prompts: Sequence[Any] | None, bases: Sequence[Any] | None, base: Any) -> list[Any]:
    """The bases of fusion by distillation (``bases``, else ``[base]``); one-line errors for what is missing."""
    if prompts is None:
        raise FusionError("fuse --method distill needs --prompts: one file of the task's inputs per adapter")
    given = list(bases) if bases is not None else ([base] if base is not None else [])
    if not given:
        raise FusionError("fuse --method distill needs the adapters' bases: --bases (one, or one per adapter)")
    return given


def _one_kind(inputs: Sequence[Any]) -> str:
    """The kind (:func:`input_kind`) all ``inputs`` share; a one-line error when they do not."""
    kinds = [input_kind(ref) for ref in inputs]
    first = kinds[0]
    if len(set(kinds)) > 1:
        other = next(i for i, kind in enumerate(kinds) if kind != first)
        words = {"adapter": "a PEFT adapter", "image": "an image-model LoRA", "model": "a model"}
        raise FusionError(
            f"{inputs[0]} is {words[first]} but {inputs[other]} is {words[kinds[other]]}: fuse inputs of one kind"
        )
    return first


def fuse(
    model_a: Any,
    model_b: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    more: Sequence[Any] = (),
    base: Any = None,
    rank: int | None = None,
    out_format: str | None = None,
    options: FuseOptions | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    prompts: Sequence[Any] | None = None,
    bases: Sequence[Any] | None = None,
    target_base: Any = None,
    synthesize: int | Sequence[int] = 0,
    min_kept: float | None = None,
    distill: Any = None,
    generic_text: str | None = None,
    **overrides: Any,
) -> FusionResult:
    """Fuse ``N >= 2`` fine-tuned models, language-model LoRAs (PEFT, GGUF) or image-model LoRAs of one base.

    LoRA adapters are fused by distillation (:func:`loraport.fusion.fuse_distilled`) with
    ``method="distill"``, or ``method="auto"`` with ``prompts``: each adapter teaches its behaviour on
    its own prompts (``prompts``, one per adapter) on its own base (``bases``: one for all or one per
    adapter), and one LoRA on ``target_base`` (default: the shared base) learns them all.

    Args:
        model_a, model_b, more: model directories (or hub ids, open checkpoints); or PEFT
            adapter directories or GGUF LoRAs (or loaded :class:`~loraport.adapters.LoraAdapter`);
            or kohya / diffusers LoRA files (or :class:`~loraport.diffusion.DiffusionLora`). All of
            one kind.
        out: the output directory (models, adapters) or ``.safetensors`` file / directory
            (image-model LoRAs), written atomically; adapters and image LoRAs may be fused in
            memory only (``None``).
        base: models: the common base C of the task-vector methods; adapters: the base for
            ``regmean`` and GGUF LoRAs (the ``.gguf`` model); image LoRAs: the Stable Diffusion
            base (resolves kohya names).
        rank: adapters and image LoRAs: the fused rank (default: the sum of the input ranks);
            models: RGSP's SVD rank.
        out_format: adapters: ``peft`` or ``gguf`` (default: ``gguf`` for a ``.gguf`` ``out``, else
            the first input's); image LoRAs: ``kohya``, ``diffusers`` or ``peft`` (default: the
            first input's).
        options, overrides: a :class:`~loraport.fusion.FuseOptions` and keyword overrides of its
            fields (``method="ties"``, ``density=0.5``, ``scaling=1.5``).

    Returns:
        A :class:`~loraport.fusion.FusionResult` (``adapter`` holds a fused adapter).

    Raises:
        LoraportError: inputs of different kinds, and everything :func:`loraport.fusion.fuse`,
            :func:`loraport.fusion.fuse_adapters` and :func:`loraport.diffusion.fuse.fuse_diffusion`
            refuse (one-line messages naming the file).

    Example::

        >>> fuse("lora-facts", "lora-bins", "lora-both", method="ties", scaling=1.5)   # doctest: +SKIP
        >>> fuse("style.safetensors", "subject.safetensors", "both.safetensors")       # doctest: +SKIP
    """
    inputs = [model_a, model_b, *more]
    method = overrides.get("method", options.method if options is not None else "auto")
    if method == "distill" or (method == "auto" and prompts is not None):
        from .fusion import fuse_distilled
        from .fusion.distilled import DEFAULT_MIN_KEPT

        given_bases = _distill_bases(prompts, bases, base)
        return fuse_distilled(
            inputs, out, bases=given_bases, prompts=list(prompts), target_base=target_base, synthesize=synthesize,
            rank=rank, method=method, min_kept=DEFAULT_MIN_KEPT if min_kept is None else min_kept, distill=distill,
            generic_text=generic_text, out_format=out_format, report_path=report_path, overwrite=overwrite,
            progress=progress,
        )  # fmt: skip
    if prompts is not None or bases is not None or target_base is not None:
        raise FusionError(DISTILL_ONLY)
    kind = _one_kind(inputs)
    common: dict[str, Any] = dict(
        options=options, report_path=report_path, overwrite=overwrite, progress=progress, **overrides
    )
    if kind == "image":
        from .diffusion.fuse import fuse_diffusion

        return fuse_diffusion(inputs, out, base=base, rank=rank, out_format=out_format, **common)
    from .fusion import fuse as fuse_models
    from .fusion import fuse_adapters

    if kind == "adapter":
        return fuse_adapters(model_a, model_b, out, more=more, rank=rank, base=base, out_format=out_format, **common)
    if out_format is not None:
        raise FusionError("--out-format is for fusing adapters; fused models are written as safetensors")
    if out is None:
        raise FusionError("model fusion writes a model directory: pass out")
    if rank is not None:
        common["rank"] = rank
    return fuse_models(model_a, model_b, out, more=more, base=base, **common)


def check_fuse_args(args: argparse.Namespace) -> str:
    """Every check of a parsed ``fuse`` command line (:func:`loraport.fusion.arguments.add_fuse_arguments`)
    that needs no work: input counts, kinds and flags that go together, the method's settings (distillation:
    each prompt file is read once). ``loraport fuse`` runs it first; ``loraport batch`` runs it for every
    ``fuse:`` job before any job starts.

    Returns the inputs' kind (``adapter``, ``image`` or ``model``, as :func:`input_kind`).

    Raises:
        LoraportError: the first problem, in one line naming the flag.
    """
    from .adapters import is_gguf_lora
    from .distill.multi import check_teacher_counts
    from .distill.options import DistillOptions
    from .fusion.arguments import DISTILL_SKIP, distilled, fuse_options_from_args
    from .fusion.options import check_calibration_count, resolve_options
    from .option_fields import group_from_args

    models = list(args.models)
    if len(models) < 2:
        raise LoraportError(f"--models needs at least two inputs, got {len(models)}")
    kinds = [input_kind(m) for m in models]
    if "adapter" in kinds and "model" in kinds:
        which, other = models[kinds.index("adapter")], models[kinds.index("model")]
        raise LoraportError(
            f"{which} is a LoRA adapter but the other input is not ({other}): pass only models or only adapters"
        )
    kind = _one_kind(models)
    gguf = args.out_format == "gguf" or str(args.out).endswith(".gguf") or any(is_gguf_lora(m) for m in models)
    if kind == "adapter" and args.base and args.method != "regmean" and not gguf:
        raise LoraportError(
            "--base is for model fusion (regmean on adapters, GGUF LoRAs); adapters are fused on their shared "
            "base (C = 0)"
        )
    if not distilled(args):
        if args.prompts or args.bases or args.target_base:
            raise LoraportError(DISTILL_ONLY)
        if args.calibration:
            check_calibration_count(len(args.calibration), len(models))
        resolve_options(fuse_options_from_args(args), {}, kind)
        return kind
    bases = _distill_bases(args.prompts, args.bases, args.base)
    check_teacher_counts(len(models), len(bases), len(args.prompts), _synthesize(args))
    settings = group_from_args(args, DistillOptions, DISTILL_SKIP, "distill.")
    for given in args.prompts:
        dataclasses.replace(settings, prompts=given).validate()
    return kind


def _synthesize(args: argparse.Namespace) -> int | list[int]:
    """``--synthesize``: one count for every adapter, or one per adapter."""
    return int(args.synthesize[0]) if len(args.synthesize) == 1 else list(args.synthesize)


def fuse_from_args(args: argparse.Namespace, *, progress: bool = True) -> FusionResult:
    """Run a parsed ``fuse`` command line: :func:`check_fuse_args`, then :func:`fuse` with its settings.

    The one place the ``fuse`` flags become a fusion: ``loraport fuse`` and the ``fuse:`` jobs
    of ``loraport batch`` both call it (``args.out``, ``args.overwrite`` and ``args.report`` as
    parsed; ``progress``: progress bars on stderr).
    """
    from .distill.options import DistillOptions
    from .fusion.arguments import DISTILL_SKIP, distilled, fuse_options_from_args
    from .option_fields import group_from_args

    kind = check_fuse_args(args)
    first, second, *more = args.models
    common: dict[str, Any] = dict(
        more=more, base=args.base, out_format=args.out_format, report_path=args.report, overwrite=args.overwrite,
        progress=progress,
    )  # fmt: skip
    if distilled(args):
        return fuse(
            first, second, args.out, rank=args.rank, method=args.method, prompts=args.prompts, bases=args.bases,
            target_base=args.target_base, synthesize=_synthesize(args), min_kept=args.min_kept,
            distill=group_from_args(args, DistillOptions, DISTILL_SKIP, "distill."),
            generic_text=args.calibration[0] if args.calibration else None, **common,
        )  # fmt: skip
    rank = args.rank if kind != "model" else None
    return fuse(first, second, args.out, rank=rank, options=fuse_options_from_args(args), **common)


__all__ = ["check_fuse_args", "fuse", "fuse_from_args", "input_kind", "transfer"]
