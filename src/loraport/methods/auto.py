"""``auto``: the default, chosen by the quality benchmark (benchmarks/results/quality.md).

On the zoo, copying the factors (``identity``) was the best data-free port whenever the
shapes match (close derivatives of the source), and no method moved accuracy on unrelated
bases; ``prolora`` is the method that keeps most of a standard LoRA when shapes differ.
"""

from __future__ import annotations

from .base import MethodContext, MethodResult
from .identity import identity
from .prolora import prolora


def auto(ctx: MethodContext) -> MethodResult:
    """``identity`` for modules whose shapes match, ``prolora`` for the others."""
    if ctx.same_shape:
        result = identity(ctx)
        result.note = "auto: identity (equal shapes)"
        return result
    result = prolora(ctx)
    result.note = f"auto: prolora ({result.note})" if result.note else "auto: prolora"
    return result
