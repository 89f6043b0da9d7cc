"""The end of a port: the report's totals, the atomic write, the result."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..adapters import LoraAdapter, LoraModule
from ..calibrate import CALIBRATED
from ..calibrate.options import options_summary
from ..distill.options import DISTILL, distill_summary
from ..errors import TransferError
from ..io import atomic_directory
from ..report import TransferReport, peak_rss_mb
from .options import TransferOptions


@dataclass
class TransferResult:
    """What :func:`transfer` returns: the target adapter, its report, where it was written."""

    adapter: LoraAdapter
    report: TransferReport
    output: Path | None = None


def _report_options(options: TransferOptions) -> dict[str, Any]:
    """The options as the report records them: no cache path, the calibration text by name only."""
    values = {
        f.name: getattr(options, f.name)
        for f in fields(options)
        if f.name not in ("cache_dir", "calibrated", "distill")
    }
    if options.method == CALIBRATED:
        values["calibrated"] = options_summary(options.calibrated)
    if options.method == DISTILL:
        values["distill"] = distill_summary(options.distill)
        values["calibrated"] = {"text": options_summary(options.calibrated)["text"], "init": options.calibrated.init}
    return values


def new_report(options: TransferOptions, source: str, target: str, adapter: LoraAdapter) -> TransferReport:
    """An empty report for a port of ``adapter`` (options, bases, dropped parts)."""
    return TransferReport(
        method=options.method,
        source_base=source,
        target_base=target,
        adapter=str(adapter.path) if adapter.path else "<in memory>",
        options=_report_options(options),
        dropped=dict(adapter.dropped),
    )


def write_port_dir(
    out: str | os.PathLike[str],
    overwrite: bool,
    report: TransferReport,
    write: Callable[[Path], object],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a port into the directory ``out`` atomically: ``write(tmp)``, the report, any extra files."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write(tmp)
        report.output = str(Path(out))
        report.save(tmp / "loraport_report.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def finish_report(report: TransferReport, started: float, report_path: str | os.PathLike[str] | None) -> None:
    """Stamp the total time and write the report where asked."""
    report.seconds = time.perf_counter() - started
    if report_path is not None:
        report.save(report_path)


def check_written(
    report: TransferReport,
    modules: dict[str, LoraModule],
    started: float,
    report_path: str | os.PathLike[str] | None,
    why: str | None = None,
) -> None:
    """Fill the report's totals; with no module to write, save the report (if asked) and raise ``TransferError``
    (its message: ``why`` if given, else the reasons modules were skipped)."""
    report.output_modules = len(modules)
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = peak_rss_mb()
    if not modules:
        if report_path is not None:
            report.save(report_path)
        if why is not None:
            raise TransferError(why)
        reasons = sorted({r.reason for r in report.records if r.reason})
        raise TransferError(
            f"every module was skipped ({len(report.records)} unit(s); "
            f"{'; '.join(reasons[:3]) or 'no units'}); no adapter written"
        )


__all__ = ["TransferResult", "check_written", "finish_report", "new_report", "write_port_dir"]
