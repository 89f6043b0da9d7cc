"""The per-module transfer report: what transferred, what did not, and why.

One record per *unit* (a source module, or one role of a fused module, paired with its
target), plus totals. Written as JSON (``to_json``) and Markdown (``to_markdown``), with
an optional PNG plot (``save_plot``, needs the ``[plot]`` extra).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_text


@dataclass
class ModuleRecord:
    """One source -> target pairing.

    ``sim_*`` are ``None`` when the method did not need both subspaces and no threshold was
    set; ``kept_energy = ||dW_t||_F / ||dW_s||_F``; ``decision`` is ``transferred``,
    ``skipped`` or ``fallback:<method>``.
    """

    source_module: str
    target_module: str
    role: str
    source_layer: int
    target_layer: int
    source_shape: tuple[int, int]
    target_shape: tuple[int, int]
    decision: str = "transferred"
    reason: str = ""
    k: int | None = None
    sim_U: float | None = None
    sim_V: float | None = None
    sim: float | None = None
    sim_above_chance: float | None = None
    chance_U: float | None = None
    chance_V: float | None = None
    kept_energy: float | None = None
    source_norm: float | None = None
    target_norm: float | None = None
    rank: int | None = None
    note: str = ""
    # Calibrated transfer only (``None`` otherwise): the relative ridge weight and its absolute
    # value lam', tokens used, and relative fit errors ||dW X_t - Y||^2 / ||Y||^2 of the init, of
    # a plain copy (equal shapes) and of the result; Y is the teacher's module output minus the
    # student's base output (the adapter's contribution dW_s X_s with --calib-output-weight 0).
    ridge: float | None = None
    ridge_abs: float | None = None
    calib_tokens: int | None = None
    fit_before: float | None = None
    fit_copy: float | None = None
    fit_after: float | None = None
    # No-harm rule: held-out fit error of each candidate ("port", "copy" where shapes match,
    # "none" = left out), relative to leaving the module out.
    heldout: dict[str, float] | None = None

    @property
    def transferred(self) -> bool:
        return self.decision != "skipped"


@dataclass
class TransferReport:
    """Everything a user needs to judge a port."""

    method: str
    source_base: str
    target_base: str
    adapter: str
    options: dict[str, Any]
    records: list[ModuleRecord] = field(default_factory=list)
    layer_map: dict[int, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    output_modules: int = 0
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    output: str | None = None
    calibration: dict[str, Any] | None = None  # calibrated transfer: samples, tokens, seconds, peak memory
    distill: dict[str, Any] | None = None  # distillation: teacher, student, held-out agreement, perplexity

    # -- totals -------------------------------------------------------------------------
    @property
    def transferred(self) -> list[ModuleRecord]:
        return [r for r in self.records if r.transferred]

    @property
    def skipped(self) -> list[ModuleRecord]:
        return [r for r in self.records if not r.transferred]

    @staticmethod
    def _mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None and not math.isnan(v)]
        return sum(present) / len(present) if present else None

    def totals(self) -> dict[str, Any]:
        records = self.records
        return {
            "units": len(records),
            "transferred": len(self.transferred),
            "skipped": len(self.skipped),
            "coverage": len(self.transferred) / len(records) if records else 0.0,
            "output_modules": self.output_modules,
            "mean_similarity": self._mean([r.sim for r in records]),
            "mean_similarity_above_chance": self._mean([r.sim_above_chance for r in records]),
            "mean_kept_energy": self._mean([r.kept_energy for r in self.transferred]),
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
        }

    def summary(self) -> str:
        """The closing summary printed by the command line."""
        t = self.totals()

        def fmt(value: float | None, digits: int = 3) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        lines = [
            f"{self.method}: {t['transferred']}/{t['units']} module(s) transferred, {t['skipped']} skipped "
            f"-> {t['output_modules']} target module(s)",
            f"mean similarity {fmt(t['mean_similarity'])} (above chance {fmt(t['mean_similarity_above_chance'])}), "
            f"mean kept energy {fmt(t['mean_kept_energy'])}",
            f"time {self.seconds:.2f} s, peak RSS {fmt(self.peak_rss_mb, 0)} MB, "
            f"subspace cache {self.cache_hits} hit(s) / {self.cache_misses} miss(es)",
        ]
        if self.calibration:
            c = self.calibration
            lines.append(
                f"calibration: {c['samples']} sample(s), {c['tokens']} token(s) from {c['source']}, "
                f"{c['seconds']:.1f} s, peak RSS {c['peak_rss_mb']:.0f} MB"
            )
            if c.get("mode") == "mapped":
                lines.append(
                    f"mapped: {c['aligned_share']:.0%} of target positions aligned, layers paired by {c['depth']}, "
                    f"mean held-out R^2 of the {c['map']} maps {c['mean_map_r2']:.2f}"
                )
        if self.distill and "heldout" in self.distill:
            d, held = self.distill, self.distill["heldout"]
            lines.append(
                f"distill: {d['student']['steps']} step(s), held-out agreement {held['start']['agreement']:.3f} -> "
                f"{held['distilled']['agreement']:.3f} (written: {d['chosen']}), generic perplexity "
                f"{d['generic']['perplexity_change']:+.1%}, {d['seconds']:.1f} s, peak RSS {d['peak_rss_mb']} MB"
            )
        for note in self.notes:
            if note.startswith("WARNING"):
                lines.append(note)
        reasons: dict[str, int] = {}
        for record in self.skipped:
            reasons[record.reason] = reasons.get(record.reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"skipped x{count}: {reason}")
        return "\n".join(lines)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {
            "method": self.method,
            "source_base": self.source_base,
            "target_base": self.target_base,
            "adapter": self.adapter,
            "output": self.output,
            "options": self.options,
            "totals": self.totals(),
            "layer_map": {str(t): s for t, s in sorted(self.layer_map.items())},
            "notes": self.notes,
            "dropped": self.dropped,
            "modules": [asdict(r) for r in self.records],
        }
        if self.calibration is not None:
            data["calibration"] = self.calibration
        if self.distill is not None:
            data["distill"] = self.distill
        return finite_json(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        t = self.totals()

        def num(value: float | None, digits: int = 3) -> str:
            return "" if value is None else f"{value:.{digits}f}"

        lines = [
            f"# loraport transfer report ({self.method})",
            "",
            f"- adapter: `{self.adapter}`",
            f"- source base: `{self.source_base}`",
            f"- target base: `{self.target_base}`",
            f"- options: `{json.dumps(self.options, sort_keys=True)}`",
            f"- transferred {t['transferred']} of {t['units']} unit(s), skipped {t['skipped']}; "
            f"{t['output_modules']} target module(s) written",
            f"- mean similarity {num(t['mean_similarity'])}, above chance {num(t['mean_similarity_above_chance'])}, "
            f"mean kept energy {num(t['mean_kept_energy'])}",
            f"- time {self.seconds:.2f} s, peak RSS {num(self.peak_rss_mb, 0)} MB",
        ]
        for note in self.notes:
            lines.append(f"- note: {note}")
        for name, why in self.dropped.items():
            lines.append(f"- dropped `{name}`: {why}")
        lines += [
            "",
            "| source | target | role | k | sim_U | sim_V | above chance | kept energy | rank | decision |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.records:
            decision = r.decision + (f" ({r.reason})" if r.reason else "")
            lines.append(
                f"| {r.source_module} | {r.target_module} | {r.role} | {r.k or ''} | {num(r.sim_U)} | "
                f"{num(r.sim_V)} | {num(r.sim_above_chance)} | {num(r.kept_energy)} | {r.rank or ''} | {decision} |"
            )
        calibrated = [r for r in self.records if r.fit_after is not None]
        if calibrated:
            lines += [
                "",
                "| target | ridge | lam' | tokens | fit init | fit copy | fit after | held-out port / copy / none |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in calibrated:
                held = " / ".join(num((r.heldout or {}).get(k)) or "-" for k in ("port", "copy", "none"))
                lines.append(
                    f"| {r.target_module} | {num(r.ridge, 3)} | {num(r.ridge_abs, 3)} | {r.calib_tokens} | "
                    f"{num(r.fit_before)} | {num(r.fit_copy)} | {num(r.fit_after)} | {held if r.heldout else ''} |"
                )
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str]) -> list[Path]:
        """Write the report: ``.json`` and ``.md`` side by side (``.png`` too for a ``.png`` path)."""
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".json", ".md", ".png") else path
        written = [
            atomic_write_text(stem.with_suffix(".json"), self.to_json()),
            atomic_write_text(stem.with_suffix(".md"), self.to_markdown()),
        ]
        if path.suffix == ".png":
            written.append(self.save_plot(path))
        return written

    def save_plot(self, path: str | os.PathLike[str]) -> Path:
        """Per-unit similarity and kept energy, by unit index (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - optional extra
            raise ImportError("plotting needs matplotlib: pip install 'loraport[plot]'") from exc
        fig, ax = plt.subplots(figsize=(10, 3.5))
        xs = range(len(self.records))
        ax.plot(xs, [r.sim if r.sim is not None else float("nan") for r in self.records], ".", label="similarity")
        ax.plot(
            xs,
            [r.kept_energy if r.kept_energy is not None else float("nan") for r in self.records],
            "x",
            label="kept energy",
        )
        ax.set_xlabel("module")
        ax.set_ylim(0, 1.05)
        ax.legend()
        ax.set_title(f"{self.method}: {Path(self.source_base).name} -> {Path(self.target_base).name}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    On Linux ``VmHWM`` (of this process's own address space): ``ru_maxrss`` survives fork +
    exec, so a spawned worker (a process pool's, a stage's) would report at least its parent's
    peak. Elsewhere ``ru_maxrss``.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024 if sys.platform != "darwin" else usage / 2**20


def finite_json(value: Any) -> Any:
    """Replace NaN/Inf by None, recursively, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value
