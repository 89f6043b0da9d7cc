"""The student's training loop: AdamW on the LoRA factors, held-out evaluation, early stopping, checkpoints.

Every ``eval_every`` steps the student is scored on the held-out prompts and on a probe of the
training prompts (agreement with the teacher's continuation tokens, KL at the aligned answer
positions). Training stops when neither agreement nor the held-out KL has improved for
``patience`` evaluations (the held-out prompts measure a skill; the probe measures what must
be memorised, which held-out prompts cannot show; agreement counts when it rises by 0.01, the
KL when it drops by 5%), when the held-out agreement is 0.99 or more with a KL of 0.05 or less
(nothing left to learn), or at the step or time limit; the student then holds the factors of
its best evaluation. With a :class:`~loraport.distill.bound.KeepBound`, each evaluation also measures
the student's generic perplexity change and doubles the keep term's weight while it is over the bound.

Checkpoints (factors, optimiser state, the best factors and the bookkeeping) are written
after each evaluation into ``run_dir``; a run started again with the same inputs continues
from the last one. The batch order is a function of the seed and the step, so a resumed run
gives the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .bound import KeepBound
from .student import BatchStats, KeepSample, StudentSample, base_model, batch_loss, evaluate_samples, keep_loss

LATEST = "latest"
IMPROVEMENT = 1e-9
KL_IMPROVEMENT = 0.05  # a relative drop of the held-out KL that counts as progress
# A rise of agreement (held-out or probe) that counts as progress. With any rise counting, the
# Gemma-3 facts port went on past 140 steps while its probe agreement crept 0.961 -> 0.974 in
# steps of 0.006-0.013 and its held-out agreement fell (0.713 -> 0.669).
AGREEMENT_PROGRESS = 0.01
# Done: the student already says what the teacher says on the held-out prompts. A json port
# went on for 160 steps after its held-out agreement reached 0.98 with a KL of 0.09, the KL
# creeping down 1% at a time (benchmarks/results/generation.md, the first smollm2->gemma3 row).
SATURATED_AGREEMENT = 0.99
SATURATED_KL = 0.05
KEEP_LINES = 4  # generic lines per step when the target's own predictions are kept
# Texts (generic lines) per forward and backward pass: a step's batch is taken in parts whose
# gradients add up to the whole batch's, so only one part's activations are held at a time. A small
# model takes a step at once (:func:`part_sizes`).
MICRO_BATCH, KEEP_MICRO_BATCH = 8, 2
# The most body activations a step may hold to be taken in one part, in tokens x layers x (hidden +
# intermediate width) units: a 16-prompt step of 25 tokens on Gemma-3-270M (18 x (640 + 2048) a token)
# is 19M, so the real rows keep their parts of 8. Measured reason: on the demo's X (6 x (192 + 384)),
# whole batches of 64 in one part instead of 8 parts of 8 took the demo's distill row from 58 s to 32 s
# at 150 steps (2 cores, one thread; a part's fixed cost, the Python of 40 modules and their LoRA layers,
# ran 8 times a step).
PART_BUDGET = 8_000_000
BUCKET_BATCHES = 8  # batches per window sorted by length


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The student's autocast type: bfloat16 for ``bfloat16`` and ``mixed``, and for ``auto`` on CUDA and
    on a CPU with bfloat16 kernels (:func:`bf16_is_fast`); else ``None`` (float32).

    Measured on Gemma-3-270M (2 cores, AVX-512 BF16): a training step 3.0 s in float32, 2.0 s
    under bfloat16 autocast (benchmarks/results/real.md has the ports' quality side by side).
    """
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else None
    return torch.bfloat16 if precision in ("bfloat16", "mixed") else None


def weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The type the student's frozen base weights are held in: bfloat16 for ``bfloat16`` (and ``auto`` where
    bfloat16 is fast), else float32 (``mixed``: float32 weights under bfloat16 autocast).

    The LoRA factors and their AdamW state stay float32 either way (PEFT keeps adapter weights in
    float32). Measured on Gemma-3-270M (2 cores, AVX-512 BF16, one rank-8 step of 16 x 48 tokens,
    bfloat16 autocast): peak RSS 3.79 GB with float32 weights, 2.63 GB with bfloat16 weights; the
    step 1.27 s against 1.15 s (autocast no longer casts every weight on every step).
    """
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def bf16_is_fast(device: torch.device) -> bool:
    """CUDA, or a CPU with bfloat16 instructions (elsewhere bfloat16 is only emulated: slower than float32)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


LOSS_WEIGHTS = {"seq+kl": (1.0, 1.0), "kl": (0.0, 1.0), "seq": (1.0, 0.0)}  # --distill-loss: (sequence, KL)


def train_config(options: Any, autocast: torch.dtype | None, keep: bool) -> TrainConfig:
    """The training settings of a :class:`~loraport.distill.DistillOptions` (``keep``: generic lines exist)."""
    from .options import DEFAULT_MAX_STEPS

    return TrainConfig(
        options.steps or DEFAULT_MAX_STEPS, options.time, options.lr, options.warmup, options.batch_size,
        options.eval_every, options.patience, LOSS_WEIGHTS[options.loss], options.keep_weight if keep else 0.0,
        options.seed, autocast, task_shares=getattr(options, "task_shares", "even"),
    )  # fmt: skip


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX); elsewhere autocast only emulates them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class TrainConfig:
    """How the student trains (see :class:`~loraport.distill.DistillOptions`)."""

    max_steps: int
    max_seconds: float | None
    lr: float
    warmup: int
    batch_size: int
    eval_every: int
    patience: int
    weights: tuple[float, float]  # (sequence NLL, KL)
    keep_weight: float
    seed: int
    autocast: torch.dtype | None = None
    bucket: bool = True  # batches of similar lengths (less padding)
    parts: tuple[int, int] = (MICRO_BATCH, KEEP_MICRO_BATCH)  # texts, generic lines per part (part_sizes)
    task_shares: str = "even"  # a fusion's batch over its teachers: even, or by each one's gap (task_sizes)


@dataclass
class TaskSamples:
    """One teacher's share of the training: its texts on the student's tokens and its support.

    Attributes:
        name: what the report calls it (the adapter).
        train / heldout / probe: training texts, held-out texts, a probe of the training texts.
        support: the output head's rows of the support the teacher's distributions are over
            (:func:`~loraport.distill.student.head_rows`), ``None`` for the whole vocabulary.
    """

    name: str
    train: Sequence[StudentSample]
    heldout: Sequence[StudentSample]
    probe: Sequence[StudentSample]
    support: torch.Tensor | None = None


@dataclass
class Evaluation:
    """One evaluation of the student (agreement: share of the teacher's continuation tokens it predicts)."""

    step: int
    heldout_agreement: float
    heldout_kl: float
    probe_agreement: float
    probe_kl: float
    train_loss: float | None
    seconds: float
    tasks: list[dict[str, Any]] = field(default_factory=list)  # per teacher, when there are several
    generic_change: float | None = None  # the student's perplexity change on the watched lines (KeepBound)
    keep_scale: float = 1.0  # the keep weight's factor from this check on


@dataclass
class TrainState:
    """The bookkeeping of a run (saved with each checkpoint)."""

    step: int = 0
    seconds: float = 0.0
    history: list[Evaluation] = field(default_factory=list)
    best_step: int = 0
    best_heldout: float = -1.0
    best_probe: float = -1.0
    best_kl: float = float("inf")
    kept: tuple[float, float] | None = None  # (mean agreement, held-out KL) of the checkpoint kept as the best
    bad_evals: int = 0
    stopped: str = ""
    running_loss: float | None = None
    drawn: list[int] = field(default_factory=list)  # training texts each task has drawn so far
    keep_scale: float = 1.0  # the keep weight's factor (raised by a KeepBound)
    parts: list[int] = field(default_factory=list)  # texts, generic lines per backward part (config.parts)

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["best_kl"] = None if self.best_kl == float("inf") else self.best_kl
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainState:
        values = dict(values)
        values["history"] = [Evaluation(**e) for e in values["history"]]
        values["best_kl"] = float("inf") if values["best_kl"] is None else values["best_kl"]
        values["kept"] = tuple(values["kept"]) if values.get("kept") is not None else None
        return cls(**values)


def epoch_order(epoch: int, count: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None) -> list[int]:
    """The texts of one epoch in training order: a seeded permutation; with ``lengths``, bucketed: each
    window of :data:`BUCKET_BATCHES` batches is sorted by length (so a batch pads little) and the
    batches are then shuffled (so lengths do not drift through the epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    if lengths is None:
        return order
    window = batch_size * BUCKET_BATCHES
    bucketed: list[int] = []
    for start in range(0, count, window):
        bucketed += sorted(order[start : start + window], key=lambda i: (lengths[i], i))
    chunks = [bucketed[i : i + batch_size] for i in range(0, count, batch_size)]
    return [i for c in torch.randperm(len(chunks), generator=generator).tolist() for i in chunks[c]]


def batch_indices(step: int, count: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None) -> list[int]:
    """The training texts of ``step``: consecutive slices of the seeded per-epoch orders (:func:`epoch_order`)."""
    return draw_indices(step * batch_size, batch_size, count, batch_size, seed, lengths)


def draw_indices(
    start: int, take: int, count: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None
) -> list[int]:
    """``take`` training texts from position ``start`` of the run of seeded epochs (:func:`epoch_order`, bucketed
    for batches of ``batch_size``): a task whose share of the batch changes still sees every text once an epoch."""
    out: list[int] = []
    while len(out) < take:
        epoch, offset = divmod(start + len(out), count)
        out += epoch_order(epoch, count, batch_size, seed, lengths)[offset : offset + take - len(out)]
    return out


def task_sizes(batch_size: int, count: int, mode: str, last: Sequence[dict[str, Any]] = ()) -> list[int]:
    """How many texts each of ``count`` tasks gives a step: ``batch_size`` split evenly (at least one each), or
    for ``gap`` in proportion to each task's distance from its teacher at the ``last`` evaluation (1 minus the
    mean of its held-out and probe agreement), every task keeping at least half its even share.

    Measured on the four-way fusion of SmolLM2 LoRAs (benchmarks/results/fusion_real.md): with even shares the
    student matched the format and skill teachers early (agreement 0.97) while memorised facts lagged.
    """
    even = max(1, batch_size // count)
    if count == 1:
        return [batch_size]
    if mode == "even" or len(last) != count:
        return [even] * count
    floor = max(1, even // 2)
    spare = (even - floor) * count
    gaps = [max(0.0, 1.0 - (t["heldout_agreement"] + t["probe_agreement"]) / 2) for t in last]
    if sum(gaps) <= 0 or spare == 0:
        return [even] * count
    raw = [gap / sum(gaps) * spare for gap in gaps]
    sizes = [floor + int(r) for r in raw]
    by_remainder = sorted(range(count), key=lambda i: (int(raw[i]) - raw[i], i))
    for i in by_remainder[: spare - sum(int(r) for r in raw)]:
        sizes[i] += 1
    return sizes


class Checkpoints:
    """Training checkpoints in ``run_dir``: one directory per saved step, ``latest`` naming the newest."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def save(
        self,
        state: TrainState,
        params: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        best: dict[str, torch.Tensor],
    ) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{state.step:06d}"
        target = self.run_dir / name
        tmp = self.run_dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        for key, param in params.items():
            tensors[f"param.{key}"] = param.detach().cpu().contiguous()
            tensors[f"best.{key}"] = best[key].detach().cpu().contiguous()
            slot = optimizer.state.get(param, {})
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in slot:
                    tensors[f"{moment}.{key}"] = slot[moment].detach().cpu().contiguous()
        save_file(tensors, str(tmp / "tensors.safetensors"))
        steps = {
            key: int(optimizer.state[p]["step"]) for key, p in params.items() if "step" in optimizer.state.get(p, {})
        }
        (tmp / "state.json").write_text(json.dumps({"state": state.to_json(), "adam_steps": steps}), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        pointer = self.run_dir / f".{LATEST}.tmp-{os.getpid()}"
        pointer.write_text(name, encoding="utf-8")
        os.replace(pointer, self.run_dir / LATEST)
        for old in self.run_dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load(
        self, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, best: dict[str, torch.Tensor]
    ) -> TrainState | None:
        """Restore the newest checkpoint into ``params``, ``optimizer`` and ``best``; ``None`` if there is none."""
        try:
            name = (self.run_dir / LATEST).read_text(encoding="utf-8").strip()
            saved = json.loads((self.run_dir / name / "state.json").read_text(encoding="utf-8"))
            tensors = load_file(str(self.run_dir / name / "tensors.safetensors"))
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        if set(saved["adam_steps"]) - set(params) or any(f"param.{k}" not in tensors for k in params):
            return None
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[f"param.{key}"])
                best[key] = tensors[f"best.{key}"].to(param.device)
                if key in saved["adam_steps"]:
                    optimizer.state[param] = {
                        "step": torch.tensor(float(saved["adam_steps"][key])),
                        "exp_avg": tensors[f"exp_avg.{key}"].to(param.device),
                        "exp_avg_sq": tensors[f"exp_avg_sq.{key}"].to(param.device),
                    }
        return TrainState.from_json(saved["state"])


def _evaluate(
    student: Any, tasks: Sequence[TaskSamples], pad: int, device: torch.device, config: TrainConfig
) -> list[tuple[BatchStats, BatchStats]]:
    """Each task's ``(held-out, probe)`` statistics."""
    student.eval()
    out = []
    for task in tasks:
        held = evaluate_samples(student, task.heldout, pad, task.support, device, config.batch_size, config.autocast)
        seen = evaluate_samples(student, task.probe, pad, task.support, device, config.batch_size, config.autocast)
        out.append((held, seen))
    student.train()
    return out


def _record(
    state: TrainState, tasks: Sequence[TaskSamples], stats: list[tuple[BatchStats, BatchStats]]
) -> tuple[bool, bool]:
    """Append an evaluation; whether it is the best so far (:func:`is_better_checkpoint`), and whether
    it is progress worth waiting for (a record agreement, or the KL down by ``KL_IMPROVEMENT``).

    With several teachers the evaluation's agreements are the worst task's and its KLs the mean
    over tasks (the fusion must keep every task), and each task's numbers are kept beside them.
    """
    held_agreement = min(held.agreement for held, _ in stats)
    probe_agreement = min(seen.agreement for _, seen in stats)
    held_kl = sum(held.mean_kl for held, _ in stats) / len(stats)
    probe_kl = sum(seen.mean_kl for _, seen in stats) / len(stats)
    details = (
        [
            {
                "task": task.name,
                "heldout_agreement": held.agreement,
                "heldout_kl": held.mean_kl,
                "probe_agreement": seen.agreement,
            }
            for task, (held, seen) in zip(tasks, stats, strict=True)
        ]
        if len(tasks) > 1
        else []
    )
    state.history.append(
        Evaluation(
            state.step, held_agreement, held_kl, probe_agreement, probe_kl, state.running_loss,
            round(state.seconds, 2), details, keep_scale=state.keep_scale,
        )
    )  # fmt: skip
    better = is_better_checkpoint((held_agreement + probe_agreement) / 2, held_kl, state.kept)
    if better:
        state.kept = ((held_agreement + probe_agreement) / 2, held_kl)
    # A fusion's progress is its worst task's. Also counting a record on any one task (commit 5ff44b9) kept
    # the all-four SmolLM2 fusion training to step 180 instead of 100 and its worst task fell from 80 % of
    # its gain to 67 % (benchmarks/results/fusion_real.md): agreement rose where the scores did not.
    progress = (
        held_agreement > state.best_heldout + AGREEMENT_PROGRESS
        or probe_agreement > state.best_probe + AGREEMENT_PROGRESS
        or held_kl < state.best_kl * (1 - KL_IMPROVEMENT)
    )
    state.best_heldout = max(state.best_heldout, held_agreement)
    state.best_probe = max(state.best_probe, probe_agreement)
    state.best_kl = min(state.best_kl, held_kl)
    return better, progress


def is_better_checkpoint(agreement: float, kl: float, kept: tuple[float, float] | None) -> bool:
    """Whether a checkpoint of mean agreement ``agreement`` (held-out and probe) and held-out ``kl`` replaces
    the one ``kept`` so far: higher agreement wins; an equal one, a lower KL.

    Before, any new record (held-out or probe agreement, or held-out KL) replaced it: a Gemma-3
    bins port kept its step-120 checkpoint for its lowest KL (0.61) over step 70's agreement (held-out
    0.79 / probe 0.85 against 0.68 / 0.78) and scored 0.756 (benchmarks/results/real.md).
    """
    if kept is None:
        return True
    best_agreement, best_kl = kept
    if agreement > best_agreement + IMPROVEMENT:
        return True
    return agreement >= best_agreement - IMPROVEMENT and kl < best_kl


def part_sizes(
    student: Any, tasks: Sequence[TaskSamples], keep: Sequence[KeepSample], batch_size: int
) -> tuple[int, int]:
    """Texts and generic lines per backward part: a step's whole batch (all its generic lines) in one part
    where its body activations stay under :data:`PART_BUDGET` (by the mean lengths), else parts of
    :data:`MICRO_BATCH` (:data:`KEEP_MICRO_BATCH`).

    All or the fixed parts, nothing between: a model that does not fit trains exactly as before
    (Gemma-3's 4 generic lines of 48 tokens are 9.3M units: still 2 a part).
    """
    config = getattr(base_model(student), "config", None)
    config = getattr(config, "text_config", None) or config
    dims = [getattr(config, name, None) for name in ("num_hidden_layers", "hidden_size", "intermediate_size")]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return MICRO_BATCH, KEEP_MICRO_BATCH
    per_token = dims[0] * (dims[1] + dims[2])

    def part(lengths: list[int], count: int, fixed: int) -> int:
        mean = sum(lengths) / len(lengths) if lengths else 0.0
        return max(count, fixed) if count * mean * per_token <= PART_BUDGET else fixed

    texts = part([len(s.ids) for task in tasks for s in task.train], batch_size, MICRO_BATCH)
    return texts, part([len(s.ids) for s in keep], KEEP_LINES, KEEP_MICRO_BATCH)


def _step_backward(
    student: Any, tasks: Sequence[TaskSamples], keep: Sequence[KeepSample], step: int, pad: int,
    device: torch.device, config: TrainConfig, lengths: list[list[int] | None], keep_support: torch.Tensor | None,
    sizes: Sequence[int], drawn: Sequence[int], keep_scale: float = 1.0,
) -> float:  # fmt: skip
    """The step's gradients and loss: each task's batch (``batch_size`` texts split over the tasks: ``sizes``,
    drawn from each task's ``drawn`` position), each task's mean weighted by its share of the texts, plus
    ``keep_weight`` (times ``keep_scale``) times the keep term.

    Each part (``config.parts``: texts, generic lines; :func:`part_sizes`) is backpropagated on its own,
    its sums divided by the whole batch's counts, so the gradients add up to the whole batch's and
    only one part's activations are held at a time.
    """
    total = 0.0
    # Even shares divide by the task count, as before shares could differ: the same bits as earlier runs.
    even = len(set(sizes)) == 1
    window = task_sizes(config.batch_size, len(tasks), "even")[0]  # the epochs are bucketed for even shares
    for index, task in enumerate(tasks):
        picked = draw_indices(drawn[index], sizes[index], len(task.train), window, config.seed + index, lengths[index])
        chosen = [task.train[i] for i in picked]
        totals = (sum(s.seq_ids.numel() for s in chosen), sum(s.kl_positions.numel() for s in chosen))
        for start in range(0, len(chosen), config.parts[0]):
            part = chosen[start : start + config.parts[0]]
            loss, _ = batch_loss(student, part, pad, task.support, config.weights, device, config.autocast, totals)
            total += _backward(loss / len(tasks) if even else loss * (sizes[index] / sum(sizes)))
    if keep and config.keep_weight > 0:
        count = min(KEEP_LINES, len(keep))
        lines = [keep[(step * count + j) % len(keep)] for j in range(count)]
        positions = sum(len(line.ids) - 1 for line in lines)
        for start in range(0, count, config.parts[1]):
            part = lines[start : start + config.parts[1]]
            kept = keep_loss(student, part, pad, device, config.autocast, keep_support, positions)
            total += _backward(config.keep_weight * keep_scale * kept)  # x 1.0 is exact: unscaled runs as before
    return total


def _backward(loss: torch.Tensor) -> float:
    if loss.requires_grad:
        loss.backward()
    return float(loss.detach())


def train_student(
    student: Any,
    params: dict[str, torch.Tensor],
    tasks: Sequence[TaskSamples],
    keep: Sequence[KeepSample],
    pad: int,
    device: torch.device,
    config: TrainConfig,
    run_dir: Path,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    keep_support: torch.Tensor | None = None,
    bound: KeepBound | None = None,
) -> TrainState:
    """Train ``params`` (the student's LoRA factors) on one teacher's ``tasks`` or several (a fusion) and
    leave the best of them in place.

    ``keep``: generic text whose target-base predictions the student keeps (over ``keep_support``);
    ``bound``: at every check the student's generic perplexity change is measured and the keep weight
    doubled while it is over the bound's limit (:class:`~loraport.distill.bound.KeepBound`).
    ``on_step(step)`` is called after every step (tests interrupt a run with it).
    """
    config = replace(config, parts=part_sizes(student, tasks, keep, config.batch_size))
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0, foreach=False)
    best = {key: p.detach().clone() for key, p in params.items()}
    checkpoints = Checkpoints(run_dir)
    state = checkpoints.load(params, optimizer, best)
    if state is None:
        state = TrainState()
        _record(state, tasks, _evaluate(student, tasks, pad, device, config))
        checkpoints.save(state, params, optimizer, best)
    state.parts = list(config.parts)  # what this run's steps take, a resumed run's too (for the report)
    bar = tqdm(
        total=config.max_steps,
        initial=state.step,
        desc="loraport distill",
        unit="step",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    student.train()
    lengths = [[len(sample.ids) for sample in task.train] if config.bucket else None for task in tasks]
    started = time.perf_counter() - state.seconds
    while not state.stopped:
        if state.step >= config.max_steps:
            state.stopped = f"step limit ({config.max_steps})"
        elif config.max_seconds is not None and state.seconds >= config.max_seconds:
            state.stopped = f"time limit ({config.max_seconds:g} s)"
        if state.stopped:
            if (
                state.history[-1].step != state.step
                and _record(state, tasks, _evaluate(student, tasks, pad, device, config))[0]
            ):
                _take_best(state, params, best)
            break
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (state.step + 1) / (config.warmup + 1))
        sizes = task_sizes(config.batch_size, len(tasks), config.task_shares, state.history[-1].tasks)
        if not state.drawn:  # a new run, or one saved before the draws were counted (even shares then)
            state.drawn = [state.step * size for size in task_sizes(config.batch_size, len(tasks), "even")]
        value = _step_backward(student, tasks, keep, state.step, pad, device, config, lengths, keep_support, sizes,
                               state.drawn, state.keep_scale)  # fmt: skip
        state.drawn = [d + size for d, size in zip(state.drawn, sizes, strict=True)]
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.running_loss = value if state.running_loss is None else 0.9 * state.running_loss + 0.1 * value
        state.step += 1
        state.seconds = time.perf_counter() - started
        bar.update(1)
        if state.step % config.eval_every == 0:
            stats = _evaluate(student, tasks, pad, device, config)
            better, progress = _record(state, tasks, stats)
            if better:
                _take_best(state, params, best)
            state.bad_evals = 0 if progress else state.bad_evals + 1
            if state.bad_evals >= config.patience:
                state.stopped = f"no improvement in {config.patience} evaluations"
            latest = state.history[-1]
            if bound is not None and keep and config.keep_weight > 0 and bound.due(state.history):
                latest.generic_change = bound.change(student, device)
                state.keep_scale = latest.keep_scale = bound.next_scale(latest.generic_change, state.keep_scale)
            for detail, size in zip(latest.tasks, task_sizes(config.batch_size, len(tasks), config.task_shares,
                                                             latest.tasks), strict=False):  # fmt: skip
                detail["next_share"] = size  # the texts per step this task gives until the next check
            if latest.heldout_agreement >= SATURATED_AGREEMENT and latest.heldout_kl <= SATURATED_KL:
                saturated = f"held-out agreement {latest.heldout_agreement:.2f}, KL {latest.heldout_kl:.3f}"
                state.stopped = state.stopped or f"{saturated}: nothing left to learn"
            bar.set_postfix(loss=f"{state.running_loss:.3f}", agree=f"{latest.heldout_agreement:.2f}",
                            kl=f"{latest.heldout_kl:.3f}")  # fmt: skip
            state.seconds = time.perf_counter() - started
            checkpoints.save(state, params, optimizer, best)
        if on_step is not None:
            on_step(state.step)
    bar.close()
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(best[key])
    checkpoints.save(state, params, optimizer, best)
    student.eval()
    return state


def _take_best(state: TrainState, params: dict[str, torch.Tensor], best: dict[str, torch.Tensor]) -> None:
    state.best_step = state.step
    for key, param in params.items():
        best[key] = param.detach().clone()


__all__ = [
    "Checkpoints",
    "Evaluation",
    "TaskSamples",
    "TrainConfig",
    "TrainState",
    "batch_indices",
    "draw_indices",
    "epoch_order",
    "task_sizes",
    "train_student",
]
