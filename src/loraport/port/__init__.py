"""The port core both fronts build on: plan the units, fetch subspaces, run a method per unit,
assemble the factors, write atomically, finish the report.

The language-model front (:mod:`loraport.llm`) and the image-model front
(:mod:`loraport.diffusion`) pair their modules into :class:`~loraport.pairing.Unit` s, call
:func:`port_units` and :func:`assemble_modules`, and write their formats with
:func:`write_port_dir`. The options of a port are declared once in :mod:`.options`.
"""

from __future__ import annotations

from .assemble import assemble_modules
from .options import (
    DEFAULT_METHOD,
    DEFAULT_SUBSPACE_RANK,
    TransferOptions,
    add_transfer_arguments,
    options_from_args,
)
from .output import TransferResult, check_written, finish_report, new_report, write_port_dir
from .units import Part, plan_units, port_method, port_units, run_units

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_SUBSPACE_RANK",
    "Part",
    "TransferOptions",
    "TransferResult",
    "add_transfer_arguments",
    "assemble_modules",
    "check_written",
    "finish_report",
    "new_report",
    "options_from_args",
    "plan_units",
    "port_method",
    "port_units",
    "run_units",
    "write_port_dir",
]
