"""The fusion report: one record per tensor (or adapter module), per-layer means, totals.

Written as JSON (:meth:`FusionReport.to_json`) and Markdown (:meth:`FusionReport.to_markdown`)
side by side by :meth:`FusionReport.save`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from ..report import finite_json

_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The first ``.<int>.`` in a tensor name (``model.layers.3.mlp...`` -> 3), else ``None``."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


@dataclass
class TensorRecord:
    """One output tensor (model fusion) or module (adapter fusion).

    ``action``: the method name, ``average`` (not selected for the method, or RegMean's
    fallback), ``task_arithmetic`` (RegMean's other fallback), ``identical`` (bit-identical
    inputs copied), ``copied_from_a`` / ``copied_from_b`` / ``copied_from_model_3`` ... (present
    in one input only, or a shape mismatch under ``allow_mismatch``). RGSP fields (``lam``, ``d``,
    ``s_rel``, ``h_rel``, ``tau_proj_norm``, ``tau_ortho_norm``, ``rank``) are ``None`` for other
    actions. ``rel_diff = max_i ||W_i - W_A|| / ||W_A||``; ``position`` is where the result lies on
    the A -> B line (0: A, 0.5: average, 1: B; two inputs only). Adapter fusion adds ``out_rank`` and
    ``dropped_energy`` (fraction of ``||dW||_F^2`` lost to the rank bound).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    action: str
    layer: int | None = None
    seconds: float = 0.0
    rel_diff: float | None = None
    position: float | None = None
    rank: int | None = None
    lam: float | None = None
    d: float | None = None
    s_rel: float | None = None
    h_rel: float | None = None
    tau_proj_norm: float | None = None
    tau_ortho_norm: float | None = None
    gw_converged: bool | None = None
    gw_epsilon: float | None = None
    out_rank: int | None = None
    dropped_energy: float | None = None
    note: str = ""


@dataclass
class FusionReport:
    """Everything needed to judge a fusion run."""

    method: str
    inputs: list[str]
    base: str | None
    options: dict[str, Any]
    kind: str = "model"
    records: list[TensorRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    output: str | None = None
    calibration: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None  # fusion by distillation: teachers, tasks, student, perplexity, timings

    def extrapolation_notes(self) -> list[str]:
        """A plain statement when the fused tensors lie past B on the A -> B line (rgsp's gamma > 0.5)."""
        position = self.totals()["mean_position"]
        if position is None or position <= 1.0 + 1e-3:
            return []
        gamma = self.options.get("gamma")
        why = f" (rgsp gamma = {gamma:g} puts W* near (A + B)/2 + gamma (B - A))" if gamma is not None else ""
        return [
            f"extrapolation: the fused tensors lie at mean position {position:.2f} on the A -> B line "
            f"(0 = A, 0.5 = average, 1 = B): past B, not between A and B{why}"
        ]

    # -- totals -------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for record in self.records:
            result[record.action] = result.get(record.action, 0) + 1
        return result

    @staticmethod
    def _mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None and math.isfinite(v)]
        return sum(present) / len(present) if present else None

    def method_records(self) -> list[TensorRecord]:
        return [r for r in self.records if r.action == self.method]

    def totals(self) -> dict[str, Any]:
        fused = self.method_records()
        return {
            "tensors": len(self.records),
            "actions": self.counts(),
            "mean_lambda": self._mean([r.lam for r in fused]),
            "mean_d": self._mean([r.d for r in fused]),
            "mean_position": self._mean([r.position for r in fused]),
            "gw_unconverged": sum(1 for r in fused if r.gw_converged is False),
            "max_dropped_energy": max((r.dropped_energy or 0.0 for r in self.records), default=0.0),
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
        }

    def layers(self) -> list[dict[str, Any]]:
        """Per-layer means over the method's records (tensors without a layer index: ``None``)."""
        groups: dict[int | None, list[TensorRecord]] = {}
        for record in self.method_records():
            groups.setdefault(record.layer, []).append(record)
        rows = []
        for layer in sorted(groups, key=lambda x: (x is None, x if x is not None else 0)):
            recs = groups[layer]
            rows.append(
                {
                    "layer": layer,
                    "tensors": len(recs),
                    "lam": self._mean([r.lam for r in recs]),
                    "d": self._mean([r.d for r in recs]),
                    "s_rel": self._mean([r.s_rel for r in recs]),
                    "h_rel": self._mean([r.h_rel for r in recs]),
                    "position": self._mean([r.position for r in recs]),
                    "seconds": sum(r.seconds for r in recs),
                }
            )
        return rows

    def summary(self) -> str:
        """The closing summary printed by the command line."""
        t = self.totals()

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4g}"

        actions = ", ".join(f"{n} {a}" for a, n in sorted(t["actions"].items()))
        lines = [f"{self.method} ({self.kind}): {t['tensors']} tensor(s): {actions}"]
        if self.method == "rgsp":
            lines.append(
                f"mean lambda {fmt(t['mean_lambda'])}, mean d {fmt(t['mean_d'])}, "
                f"mean position on A->B {fmt(t['mean_position'])}"
            )
        elif t["mean_position"] is not None:
            lines.append(f"mean position on A->B {fmt(t['mean_position'])}")
        if self.kind == "adapter":
            lines.append(f"max dropped energy {fmt(t['max_dropped_energy'])}")
        lines.append(f"time {self.seconds:.2f} s, peak RSS {fmt(self.peak_rss_mb)} MB")
        # The extrapolation statement is never cut off by the five-note limit.
        shown = [n for n in self.notes if n.startswith("extrapolation:")]
        lines += [f"note: {n}" for n in ([n for n in self.notes if n not in shown][:5] + shown)]
        return "\n".join(lines)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return finite_json(
            {
                "kind": self.kind,
                "method": self.method,
                "inputs": self.inputs,
                "base": self.base,
                "output": self.output,
                "options": self.options,
                "totals": self.totals(),
                "notes": self.notes,
                "calibration": self.calibration,
                "distill": self.distill,
                "layers": self.layers(),
                "tensors": [asdict(r) for r in self.records],
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        t = self.totals()

        def num(value: float | None, digits: int = 4) -> str:
            return "" if value is None else f"{value:.{digits}g}"

        lines = [
            f"# loraport fusion report ({self.method}, {self.kind}s)",
            "",
            f"- inputs: {', '.join(f'`{i}`' for i in self.inputs)}",
            f"- base: `{self.base}`" if self.base else "- base: none",
            f"- options: `{json.dumps(self.options, sort_keys=True)}`",
            f"- tensors: {t['tensors']} ({', '.join(f'{a}: {n}' for a, n in sorted(t['actions'].items()))})",
            f"- mean lambda {num(t['mean_lambda'])}, mean d {num(t['mean_d'])}, "
            f"mean position on A->B {num(t['mean_position'])}",
            f"- time {self.seconds:.2f} s, peak RSS {num(self.peak_rss_mb, 5)} MB",
        ]
        lines += [f"- note: {n}" for n in self.notes]
        lines += [
            "",
            "## Per layer",
            "",
            "| layer | tensors | lambda | d | s_rel | h_rel | position | time (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in self.layers():
            lines.append(
                f"| {'' if row['layer'] is None else row['layer']} | {row['tensors']} | {num(row['lam'])} | "
                f"{num(row['d'])} | {num(row['s_rel'])} | {num(row['h_rel'])} | {num(row['position'])} | "
                f"{row['seconds']:.3f} |"
            )
        lines += [
            "",
            "## Per tensor",
            "",
            "| tensor | shape | action | rank | lambda | d | s_rel | h_rel | tau_proj | tau_ortho | rel diff | "
            "position | dropped | time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.records:
            action = r.action + (f" ({r.note})" if r.note else "")
            lines.append(
                f"| {r.name} | {'x'.join(map(str, r.shape))} | {action} | {r.out_rank or r.rank or ''} | "
                f"{num(r.lam)} | {num(r.d)} | {num(r.s_rel)} | {num(r.h_rel)} | {num(r.tau_proj_norm)} | "
                f"{num(r.tau_ortho_norm)} | {num(r.rel_diff)} | {num(r.position)} | {num(r.dropped_energy)} | "
                f"{r.seconds:.3f} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str]) -> list[Path]:
        """Write ``<stem>.json`` and ``<stem>.md`` side by side."""
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".json", ".md") else path
        return [
            atomic_write_text(stem.with_suffix(".json"), self.to_json()),
            atomic_write_text(stem.with_suffix(".md"), self.to_markdown()),
        ]
