"""The library's entry points that dispatch by adapter kind: :func:`transfer`.

Language-model adapters (PEFT) go to :mod:`loraport.llm`, image-model LoRAs (kohya, diffusers,
per-component PEFT) to :mod:`loraport.diffusion`; both build on the port core
(:mod:`loraport.port`). Nothing below this module imports a front.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .adapters import LoraAdapter
from .checkpoints import Checkpoint
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


__all__ = ["transfer"]
