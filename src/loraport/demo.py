"""``loraport demo``: port the shipped LoRA to the shipped targets with every method and score each port.

The package ships a small trained zoo (:func:`loraport.zoo.demo_dir`): a source model S, a
few targets (derivatives of S at two drift levels, a model of another architecture), a
LoRA trained on S for a memorised-facts task, the task's questions and calibration text.
The demo evaluates each base, ports the LoRA with each method, evaluates each port with
the ARC scorer (:mod:`loraport.evaluate`) and prints one table; reports and adapters go
to ``--out``. On the targets that are not derivatives of S (X), where no closed-form
method carries anything, it also distils the adapter (``method="distill"``) with the
task's training questions as prompts (:data:`DEMO_DISTILL`, :data:`DEMO_DISTILL_STEPS`).

The same helpers (:class:`TargetScorer`, :func:`port_and_score`) drive
``benchmarks/quality.py``.

Example::

    >>> rows = run_demo(out="demo-out", methods=["identity", "prolora"])  # doctest: +SKIP
    >>> print(format_table(rows))                                       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import TransferError

DEFAULT_METHODS = ("identity", "project", "lorax", "procrustes", "prolora", "calibrated")
DEFAULT_DEMO_RANK = 64
# The demo's distillation (the S-facts LoRA onto X, the task's 200 training questions as prompts, one
# torch thread, bfloat16 autocast on this CPU): settings chosen to fit the demo's minute. Measured on an
# otherwise idle 2-core machine, 2026-12-08, with each step's batch in one part (train.part_sizes), gain
# recovery (seeds 0 / 1 / 2) and port seconds (the three seeds' range):
#   batch 40, lr 4e-3, 240 steps: 0.71 / 0.71 / 0.61, 35-46 s   <- these
#   batch 32, lr 4e-3, 300 steps: 0.79 / 0.82 / 0.73, 40-44 s (the demo then takes over its minute)
#   batch 32, lr 4e-3, 250 steps: 0.63 / 0.56 / 0.56; batch 32, lr 6e-3, 250 steps: 0.50 / 0.56 / 0.54
#   batch 48, lr 4e-3, 200 steps: 0.52 / 0.67 / 0.61, 33-35 s; batch 24, lr 4e-3, 300 steps: 0.43 / 0.59 / 0.56
#   batch 64, lr 6e-3, 150 steps (the earlier demo): 0.56 / 0.36 / 0.44, 32-36 s
#   batch 32, lr 4e-3, 300 steps, only the upper half of X's layers: 0.43 / 0.29 / 0.29, 30-32 s
#   two torch threads (batch 32, lr 4e-3, 300 steps): 0.71 / 0.73 / 0.67, 35-40 s (one thread: see run_demo)
# Held-out agreement is evaluated every 25 steps with patience 8, so the step limit, not the stopping
# rule, ends training: the same seed gives the same adapter.
# Only targets that are not derivatives of S get the row: a row on D15 and D30 too would take the demo
# well past its minute.
DEMO_DISTILL: dict[str, Any] = {
    "distill_batch_size": 40,
    "distill_lr": 4e-3,
    "distill_eval_every": 25,
    "distill_patience": 8,
}
DEMO_DISTILL_STEPS = 240
MIN_GAP = 0.05  # gain recovery is undefined when the oracle barely beats the base


def gain_recovery(
    acc: float | None, base: float | None, oracle: float | None, min_gap: float = MIN_GAP
) -> float | None:
    """``(acc - base) / (oracle - base)``: 1 = as good as training on the target, 0 = no gain.

    ``None`` when a number is missing or the oracle's gain is below ``min_gap`` (a ratio of
    two tiny differences means nothing).
    """
    if acc is None or base is None or oracle is None or oracle - base < min_gap:
        return None
    return (acc - base) / (oracle - base)


@dataclass
class PortScore:
    """One row: an adapter (or none) on a target, with the port's report totals.

    ``method`` is ``"base"`` (target alone), ``"source+adapter"`` (the source with its own
    LoRA), ``"oracle"`` (a LoRA trained on the target) or a transfer method.
    """

    target: str
    method: str
    k: int | None = None
    acc: float | None = None
    acc_norm: float | None = None
    n: int = 0
    base_acc: float | None = None
    oracle_acc: float | None = None
    gain_recovery: float | None = None
    mean_similarity: float | None = None
    mean_kept_energy: float | None = None
    transferred: int | None = None
    skipped: int | None = None
    transfer_seconds: float | None = None
    eval_seconds: float | None = None
    adapter: str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TargetScorer:
    """A base model loaded once (float32) that scores itself and adapters on ARC records."""

    def __init__(self, model_dir: str | os.PathLike[str], examples: list[dict], batch_size: int = 64) -> None:
        from .evaluate import load_model, load_tokenizer

        self.model_dir = Path(model_dir)
        self.examples = examples
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = load_model(self.model_dir)

    def _score(self, model: Any) -> Any:
        from .evaluate import evaluate

        return evaluate(model, self.tokenizer, self.examples, batch_size=self.batch_size, progress=False)

    def base(self) -> Any:
        """The :class:`~loraport.evaluate.EvalResult` of the base model alone."""
        return self._score(self.model)

    def with_adapter(self, adapter_dir: str | os.PathLike[str]) -> Any:
        """Score base + a PEFT adapter (on a copy: the base stays clean)."""
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(copy.deepcopy(self.model), str(adapter_dir))
        return self._score(model)


def port_and_score(
    adapter: str | os.PathLike[str],
    source: str | os.PathLike[str],
    target_name: str,
    scorer: TargetScorer,
    method: str,
    subspace_rank: int,
    out_dir: str | os.PathLike[str],
    *,
    base_acc: float | None = None,
    oracle_acc: float | None = None,
    svd: str = "randomized",
    cache_dir: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    options: dict[str, Any] | None = None,
) -> PortScore:
    """Port ``adapter`` from ``source`` to ``scorer``'s base with ``method`` and score the result.

    The adapter and its report (``loraport_report.json`` / ``.md``) are written to
    ``out_dir``. A port where every module is skipped (``identity`` across shapes, or all
    below a threshold), or that the method refuses (``calibrated`` across widths), gives a
    row with ``acc=None`` and the reason in ``note``. ``calibration`` is the text file for
    ``method="calibrated"``; ``options`` are more :func:`~loraport.api.transfer` keywords
    (``prompts`` and the ``distill_*`` settings of ``method="distill"``). A distilled row's
    ``note`` gives its steps and held-out agreement (start -> distilled).
    """
    from .api import transfer

    row = PortScore(target_name, method, subspace_rank, base_acc=base_acc, oracle_acc=oracle_acc)
    started = time.perf_counter()
    try:
        result = transfer(
            adapter,
            source,
            scorer.model_dir,
            out_dir,
            method=method,
            subspace_rank=subspace_rank,
            svd=svd,
            cache_dir=None if cache_dir is None else str(cache_dir),
            overwrite=True,
            progress=False,
            calibration=calibration if method == "calibrated" else None,
            **(options or {}),
        )
    except TransferError as exc:
        # The table wants the reason, not the advice that follows it in parentheses.
        row.note = "n/a: shapes differ" if method == "identity" else f"n/a: {str(exc).split(' (')[0]}"
        row.k = None if method in ("identity", "calibrated") else subspace_rank
        return row
    row.transfer_seconds = time.perf_counter() - started
    totals = result.report.totals()
    row.mean_similarity = totals["mean_similarity"]
    row.mean_kept_energy = totals["mean_kept_energy"]
    row.transferred, row.skipped = totals["transferred"], totals["skipped"]
    if not any(record.k is not None for record in result.report.records):
        row.k = None  # no subspace was used (identity; calibrated started from the copy)
    distilled = result.report.distill
    if distilled and "heldout" in distilled:
        row.k = None
        held = distilled["heldout"]
        row.note = (
            f"{distilled['student']['steps']} steps; held-out agreement {held['start']['agreement']:.2f} -> "
            f"{held['distilled']['agreement']:.2f} (written: {distilled['chosen']})"
        )
    scored = scorer.with_adapter(out_dir)
    row.acc, row.acc_norm, row.n, row.eval_seconds = scored.acc, scored.acc_norm, scored.n, scored.seconds
    row.gain_recovery = gain_recovery(row.acc, base_acc, oracle_acc)
    row.adapter = str(out_dir)
    return row


# -- the demo -------------------------------------------------------------------------------


def run_demo(
    out: str | os.PathLike[str] | None = None,
    methods: Sequence[str] | None = None,
    subspace_rank: int = DEFAULT_DEMO_RANK,
    targets: Sequence[str] | None = None,
    say: Callable[[str], None] | None = print,
    distill_steps: int = DEMO_DISTILL_STEPS,
) -> list[PortScore]:
    """Run the demo on the shipped zoo; returns the table's rows (also written to ``out``).

    Args:
        out: where adapters, reports and ``results.json`` / ``results.md`` go (default: a new
            temporary directory).
        methods: transfer methods (default: the five data-free methods and ``calibrated``, on the
            shipped calibration text; ``identity`` and ``calibrated`` only where shapes match).
        subspace_rank: k for the subspace methods.
        targets: shipped targets to use (default all).
        say: progress lines (``None``: silent).
        distill_steps: training steps of the ``distill`` row on each target that is not a
            derivative of the source (:data:`DEMO_DISTILL` settings; its cache is ``out/.distill-cache``);
            0 leaves the row out.
    """
    import torch
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars for each tiny model are noise here
    # One thread: these models are too small to gain from more, and on a busy machine a second
    # OpenMP thread made the demo 20x slower (547 s instead of 27 s on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out, methods, subspace_rank, targets, say, distill_steps)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _run_demo(
    out: str | os.PathLike[str] | None,
    methods: Sequence[str] | None,
    subspace_rank: int,
    targets: Sequence[str] | None,
    say: Callable[[str], None] | None,
    distill_steps: int = DEMO_DISTILL_STEPS,
) -> list[PortScore]:
    import json

    import torch

    from .evaluate import load_arc_jsonl
    from .zoo import demo_dir, load_manifest

    zoo = load_manifest(demo_dir())
    task = zoo.data["demo"]["task"]
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="loraport-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(methods or DEFAULT_METHODS)
    targets = list(targets or zoo.targets)
    examples = load_arc_jsonl(zoo.eval_path(task))
    adapter = zoo.lora_path(zoo.source, task)
    source = zoo.model_path(zoo.source)
    prompts = _train_questions(zoo, task)
    torch.manual_seed(0)

    def note(text: str) -> None:
        if say is not None:
            say(text)

    rows: list[PortScore] = []
    note(f"demo zoo: {zoo.root}")
    note(f"task {task!r}: {len(examples)} questions; adapter trained on {zoo.source}; methods {', '.join(methods)}")
    scorer = TargetScorer(source, examples)
    base = scorer.base()
    rows.append(PortScore(zoo.source, "base", acc=base.acc, acc_norm=base.acc_norm, n=base.n))
    own = scorer.with_adapter(adapter)
    rows.append(PortScore(zoo.source, "source+adapter", acc=own.acc, acc_norm=own.acc_norm, n=own.n))
    note(f"{zoo.source}: base acc {base.acc:.3f}, with its adapter {own.acc:.3f}")
    for target in targets:
        scorer = TargetScorer(zoo.model_path(target), examples)
        base = scorer.base()
        oracle = zoo.oracle_accuracy(target, task)
        rows.append(PortScore(target, "base", acc=base.acc, acc_norm=base.acc_norm, n=base.n))
        if oracle is not None:
            rows.append(PortScore(target, "oracle", acc=oracle, n=base.n, note="trained on the target (manifest)"))
        for method in methods:
            row = port_and_score(
                adapter,
                source,
                target,
                scorer,
                method,
                subspace_rank,
                out_dir / target / method,
                base_acc=base.acc,
                oracle_acc=oracle,
                cache_dir=out_dir / ".subspace-cache",
                calibration=zoo.calibration_path,
            )
            rows.append(row)
            acc = "n/a" if row.acc is None else f"{row.acc:.3f}"
            note(f"{target}: {method} acc {acc}" + (f" ({row.note})" if row.note else ""))
        if distill_steps > 0 and prompts is not None and zoo.models[target].get("parent") != zoo.source:
            # An unrelated target: the closed-form methods carry nothing there; distillation does.
            settings = f"batch {DEMO_DISTILL['distill_batch_size']}, lr {DEMO_DISTILL['distill_lr']:g}"
            note(
                f"{target}: distill ({settings}, at most {distill_steps} steps; prompts: the task's training questions)"
            )
            options = {
                "prompts": str(prompts),
                "distill_steps": distill_steps,
                "distill_cache": str(out_dir / ".distill-cache"),
                **DEMO_DISTILL,
            }
            row = port_and_score(
                adapter,
                source,
                target,
                scorer,
                "distill",
                subspace_rank,
                out_dir / target / "distill",
                base_acc=base.acc,
                oracle_acc=oracle,
                options=options,
            )
            row.note = f"{settings}, {row.note}" if row.acc is not None else row.note
            rows.append(row)
            acc = "n/a" if row.acc is None else f"{row.acc:.3f}"
            seconds = "" if row.transfer_seconds is None else f" in {row.transfer_seconds:.0f} s"
            note(f"{target}: distill acc {acc}{seconds} ({row.note})")
    (out_dir / "results.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    (out_dir / "results.md").write_text(format_table(rows) + "\n")
    return rows


def _train_questions(zoo: Any, task: str) -> Path | None:
    """The task's training questions (ARC JSONL: distillation reads the questions, never the answers).

    ``None`` when the zoo ships no training questions apart from held-out evaluation ones.
    """
    entry = zoo.tasks[task]
    if entry.get("train"):
        return zoo.path(entry["train"])
    return zoo.eval_path(task) if entry.get("eval_is_train") else None  # memorisation: scored on its training set


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[PortScore]) -> str:
    """A Markdown table of the rows (target, method, k, acc, acc_norm, gain recovery, similarity, kept energy,
    skipped modules, port seconds, note)."""
    head = "| target | method | k | acc | acc_norm | gain recovery | mean sim | kept energy | skipped | port s | note |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        skipped = "-" if r.skipped is None else f"{r.skipped}/{(r.transferred or 0) + r.skipped}"
        lines.append(
            f"| {r.target} | {r.method} | {'-' if r.k is None else r.k} | {_fmt(r.acc)} | {_fmt(r.acc_norm)} | "
            f"{_fmt(r.gain_recovery, 2)} | {_fmt(r.mean_similarity)} | {_fmt(r.mean_kept_energy)} | {skipped} | "
            f"{_fmt(r.transfer_seconds, 1)} | {r.note} |"
        )
    return "\n".join(lines)
