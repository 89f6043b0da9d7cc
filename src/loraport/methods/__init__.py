"""Transfer methods, one per file, behind one registry (SPEC sec. 4).

>>> sorted(METHODS)
['auto', 'identity', 'lorax', 'procrustes', 'project', 'prolora']
"""

from __future__ import annotations

from .auto import auto
from .base import Adapted, MethodContext, MethodInfo, MethodResult, adapt_dimensions, importance_map
from .identity import identity
from .lorax import lorax
from .procrustes import procrustes, procrustes_rotation
from .project import project
from .prolora import prolora

METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(
            "auto",
            auto,
            needs_source=False,
            needs_target=False,
            summary="identity where shapes match, prolora where they differ (the default)",
        ),
        MethodInfo(
            "identity",
            identity,
            needs_source=False,
            needs_target=False,
            same_shape_only=True,
            summary="copy the factors (same shapes only)",
        ),
        MethodInfo(
            "project", project, needs_source=False, needs_target=True, summary="U_t U_t^T dW_s V_t V_t^T (LoRA-X Eq. 3)"
        ),
        MethodInfo(
            "lorax",
            lorax,
            needs_source=True,
            needs_target=True,
            summary="U_t (U_t^T U_s C_s V_s^T V_t) V_t^T (LoRA-X, seed 001)",
        ),
        MethodInfo(
            "procrustes", procrustes, needs_source=True, needs_target=True, summary="U_t R_u^T C_s R_v V_t^T (seed 000)"
        ),
        MethodInfo(
            "prolora",
            prolora,
            needs_source=True,
            needs_target=True,
            summary="subspace part and complement part transferred separately",
        ),
    )
}


def get_method(name: str) -> MethodInfo:
    """Look up a method by name (``ValueError`` listing the choices if unknown)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(METHODS)})") from None


__all__ = [
    "METHODS",
    "Adapted",
    "MethodContext",
    "MethodInfo",
    "MethodResult",
    "adapt_dimensions",
    "auto",
    "get_method",
    "identity",
    "importance_map",
    "lorax",
    "procrustes",
    "procrustes_rotation",
    "project",
    "prolora",
]
