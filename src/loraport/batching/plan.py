"""Planning a batch before any work: which jobs are up to date, which subspaces every port needs.

Each job's identity (its options and fingerprints of its adapter, bases and calibration file)
is recorded in its output directory (``loraport_job.json``, written atomically with the
adapter). A job is up to date when its output, report and identical record exist.

Every pending job is paired and planned with the same code as a single port
(:func:`~loraport.port.plan_units`); the distinct subspace requests over all jobs, minus
those already in the cache, are split into :class:`SubspaceTask` s of about equal cost, which
the workers compute into the shared cache before the ports run. A fusion job (``fuse:``) has
a record too (its parsed flags and fingerprints of every input) but no subspaces.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import CONFIG_NAME, GGUF_LORA_NAME, load_adapter
from ..calibrate import CALIBRATED
from ..checkpoints import Checkpoint
from ..errors import LoraportError
from ..fusion.models import REPORT_NAME as FUSION_REPORT_NAME
from ..pairing import Pairing, linear_shape
from ..port import plan_units, port_method
from ..subspace import SubspaceCache
from .manifest import BatchJob, FuseJob, Job, Problem

JOB_RECORD = "loraport_job.json"
REPORT_NAME = "loraport_report.json"  # written by transfer() into every output directory
RECORD_VERSION = 1

# Per-job memory estimate (MB): interpreter + torch, plus three float32 copies of the largest
# weight a port decomposes (the one being decomposed and two read ahead) and of the adapter;
# calibrated ports also hold both models' largest tensors (embeddings) and activations.
BASE_JOB_MB = 400.0
CALIBRATED_EXTRA_MB = 1024.0

SubspaceRequest = tuple[str, tuple[int, int] | None, int]  # tensor, rows, k


# -- job identity ----------------------------------------------------------------------------


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _digest(stamps: list[str]) -> str:
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()


def adapter_fingerprint(path: str | os.PathLike[str]) -> str:
    """Changes whenever a file of the adapter (a directory's files, or one GGUF file) may have changed (path, size,
    mtime)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file())
    return _digest([_stamp(p) for p in files])


def checkpoint_fingerprint(ckpt: Checkpoint) -> str:
    """Changes whenever a weight file or the config of the base may have changed."""
    files = sorted({ckpt.file_of(key) for key in ckpt.keys()})
    config = ckpt.root / "config.json"
    return _digest([_stamp(p) for p in files] + ([_stamp(config)] if config.exists() else []))


def job_record(job: Job, source: Checkpoint, target: Checkpoint) -> dict[str, Any]:
    """What must be unchanged for a finished job to count as done (JSON-normal: compares with a re-read file)."""
    options = {k: v for k, v in asdict(job.options).items() if k not in ("cache_dir", "use_cache")}
    calibration = job.options.calibrated.text
    inputs = {
        "adapter": adapter_fingerprint(job.adapter),
        "source_base": checkpoint_fingerprint(source),
        "target_base": checkpoint_fingerprint(target),
    }
    if isinstance(calibration, str | os.PathLike):
        inputs["calibration"] = _digest([_stamp(Path(calibration))])
    record = {
        "loraport_job": RECORD_VERSION,
        "adapter": job.adapter,
        "source_base": job.source_base,
        "target_base": job.target_base,
        "options": options,
        "inputs": inputs,
    }
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def _files(root: Path) -> list[Path]:
    """``root`` itself if a file, else every file under it but hidden ones, sorted."""
    if root.is_file():
        return [root]
    files = (p for p in root.rglob("*") if p.is_file())
    return sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts))


def input_fingerprint(path: str | os.PathLike[str]) -> str:
    """Changes whenever a file of an input may have changed: a file, or every file under a directory
    (a model, an adapter, a diffusers folder; hidden files left out)."""
    return _digest([_stamp(p) for p in _files(Path(path))])


def fuse_record(job: FuseJob) -> dict[str, Any]:
    """What must be unchanged for a finished fusion job to count as done: its parsed ``fuse`` flags
    (but ``quiet``, ``overwrite``) and fingerprints of its local inputs (a hub id is recorded by name)."""
    flags = {k: v for k, v in vars(job.args).items() if k not in ("quiet", "overwrite")}
    inputs = {path: input_fingerprint(path) for path in job.inputs if Path(path).exists()}
    record = {"loraport_job": RECORD_VERSION, "command": "fuse", "flags": flags, "inputs": inputs}
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def job_state(job: BatchJob, record: dict[str, Any]) -> str:
    """``new`` (no output), ``done`` (complete, same record), ``stale`` (an older batch output) or
    ``foreign`` (a directory no batch wrote)."""
    out = Path(job.out)
    if not out.exists():
        return "new"
    path = out / JOB_RECORD
    if not path.is_file():
        return "foreign"
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "stale"
    if isinstance(job, FuseJob):
        complete = (out / FUSION_REPORT_NAME).is_file()
    else:
        adapter = (out / CONFIG_NAME).is_file() or (out / GGUF_LORA_NAME).is_file()
        complete = (out / REPORT_NAME).is_file() and adapter
    return "done" if complete and previous == record else "stale"


# -- subspace planning -----------------------------------------------------------------------


@dataclass
class SubspaceTask:
    """Subspaces of one base for a worker to compute into the shared cache.

    ``requests`` are ``(tensor, rows, k)``; the SVD settings are those of the jobs that asked.
    """

    base: str
    transposed: bool  # the base stores its matrices (in, out) (GPT-2 Conv1D)
    requests: list[SubspaceRequest]
    svd: str
    oversample: int
    niter: int
    seed: int
    device: str
    cache_dir: str
    cost: float = 0.0


@dataclass
class BatchPlan:
    """The outcome of planning: what to run, what is up to date, and the subspace work."""

    pending: list[BatchJob] = field(default_factory=list)
    done: list[BatchJob] = field(default_factory=list)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    job_memory_mb: dict[int, float] = field(default_factory=dict)
    # (base, svd settings, device) -> (architecture, [(request, cost)] in first-use order), not yet cached
    groups: dict[tuple[Any, ...], tuple[bool, list[tuple[SubspaceRequest, float]]]] = field(default_factory=dict)
    distinct_subspaces: int = 0
    cached_subspaces: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def max_job_memory_mb(self) -> float:
        return max(self.job_memory_mb.values(), default=BASE_JOB_MB)


def _largest_tensor_bytes(ckpt: Checkpoint) -> int:
    return max((math.prod(ckpt.shape(key)) * 4 for key in ckpt.keys()), default=0)


def _part_shape(ckpt: Checkpoint, transposed: bool, key: str, rows: tuple[int, int] | None) -> tuple[int, int]:
    m, n = linear_shape(ckpt, key, transposed)
    return (rows[1] - rows[0], n) if rows is not None else (m, n)


def _fuse_memory_mb(job: FuseJob, open_base: Any) -> float:
    """A fusion job's peak estimate: three float32 copies of each adapter input (read whole), or of
    each model's largest tensor (models are read tensor by tensor); regmean and distillation run the
    models too."""
    total = 0
    for ref in [*job.args.models, *([job.args.base] if job.args.base else [])]:
        path = Path(ref)
        if not path.exists():
            continue  # a hub id: not sized here
        if job.kind == "model":
            total += _largest_tensor_bytes(open_base(str(ref)))
        else:
            total += sum(p.stat().st_size for p in _files(path))
    memory = BASE_JOB_MB + 3 * total / 2**20
    if job.args.method in ("regmean", "distill") or job.args.prompts is not None:
        memory += CALIBRATED_EXTRA_MB
    return memory


def _plan_fuse(plan: BatchPlan, job: FuseJob, overwrite: bool, open_base: Any) -> None:
    """A fusion job: done, or pending with its record and memory estimate (no subspaces)."""
    record = fuse_record(job)
    state = job_state(job, record)
    if state == "done":
        plan.done.append(job)
        return
    if state == "foreign" and not overwrite:
        raise LoraportError(f"{job.out} exists and was not written by loraport batch (pass --overwrite to replace it)")
    plan.job_memory_mb[job.index] = _fuse_memory_mb(job, open_base)
    plan.pending.append(job)
    plan.records[job.index] = record


def plan_batch(jobs: list[BatchJob], cache_dir: str | os.PathLike[str], overwrite: bool = False) -> BatchPlan:
    """Check every job against its inputs and outputs and plan the subspace work (no computing).

    Problems (missing adapter or base, an adapter that does not fit its base, an output no
    batch wrote without ``overwrite``) are collected in ``plan.problems``, one line each.
    Fusion jobs get their record and state here; they need no subspaces.
    """
    plan = BatchPlan()
    cache = SubspaceCache(cache_dir)
    checkpoints: dict[str, Checkpoint] = {}
    seen: set[str] = set()

    def open_base(name: str) -> Checkpoint:
        if name not in checkpoints:
            checkpoints[name] = Checkpoint.open(name)
        return checkpoints[name]

    try:
        for job in jobs:
            if isinstance(job, FuseJob):
                try:
                    _plan_fuse(plan, job, overwrite, open_base)
                except (LoraportError, OSError) as exc:
                    plan.problems.append((job.index, f"{job.label}: {exc}"))
                continue
            try:
                src, tgt = open_base(job.source_base), open_base(job.target_base)
                if job.out.endswith(".gguf"):
                    raise LoraportError(
                        f"out {job.out}: a batch writes each job into a directory (with its record); "
                        "set out_format: gguf for a GGUF LoRA there"
                    )
                record = job_record(job, src, tgt) if Path(job.adapter).exists() else {}
                state = job_state(job, record) if record else "new"
                if state == "done":
                    plan.done.append(job)
                    continue
                if state == "foreign" and not overwrite:
                    raise LoraportError(
                        f"{job.out} exists and was not written by loraport batch (pass --overwrite to replace it)"
                    )
                options = job.options
                adapter = load_adapter(job.adapter, drop_unsupported=options.drop_unsupported, base=src)
                pairing = Pairing(adapter, src, tgt, options.layer_map)
                _, requests = plan_units(pairing.units, port_method(options), options)
            except (LoraportError, OSError) as exc:
                plan.problems.append((job.index, f"{job.label}: {exc}"))
                continue
            plan.pending.append(job)
            plan.records[job.index] = record
            largest = 0
            for ckpt, transposed, key, rows, k in requests:
                m, n = _part_shape(ckpt, transposed, key, rows)
                largest = max(largest, m * n * 4)
                settings = (options.svd, options.oversample, options.niter, options.seed)
                cache_key = SubspaceCache.key(ckpt.fingerprint(key), rows, k, *settings)
                if cache_key in seen:
                    continue
                seen.add(cache_key)
                plan.distinct_subspaces += 1
                if cache._path(cache_key).exists():
                    plan.cached_subspaces += 1
                    continue
                group = plan.groups.setdefault((ckpt.name, *settings, options.device), (transposed, []))
                group[1].append(((key, rows, k), float(m * n * (k + options.oversample))))
            adapter_bytes = sum((mod.A.numel() + mod.B.numel()) * 4 for mod in adapter.modules.values())
            memory = BASE_JOB_MB + 3 * (largest + adapter_bytes) / 2**20
            if options.method == CALIBRATED:
                memory += CALIBRATED_EXTRA_MB + 2 * (_largest_tensor_bytes(src) + _largest_tensor_bytes(tgt)) / 2**20
            plan.job_memory_mb[job.index] = memory
            del adapter, pairing, requests
    finally:
        for ckpt in checkpoints.values():
            ckpt.close()
    return plan


def subspace_tasks(plan: BatchPlan, cache_dir: str | os.PathLike[str], parallel: int) -> list[SubspaceTask]:
    """Split the planned subspaces into tasks of about equal cost: about four per worker, each a
    contiguous run of one base's tensors (reads stay sequential within a shard)."""
    total = sum(cost for _, items in plan.groups.values() for _, cost in items)
    if total == 0:
        return []
    target = total / max(1, 4 * parallel)
    tasks: list[SubspaceTask] = []
    for (base, svd, oversample, niter, seed, device), (transposed, items) in plan.groups.items():
        current: SubspaceTask | None = None
        for request, cost in items:
            if current is None or current.cost >= target:
                current = SubspaceTask(base, transposed, [], svd, oversample, niter, seed, device, str(cache_dir))
                tasks.append(current)
            current.requests.append(request)
            current.cost += cost
    # Largest first, so the last task to finish is a small one.
    return sorted(tasks, key=lambda task: -task.cost)


__all__ = [
    "JOB_RECORD",
    "BatchPlan",
    "SubspaceTask",
    "adapter_fingerprint",
    "checkpoint_fingerprint",
    "fuse_record",
    "input_fingerprint",
    "job_record",
    "job_state",
    "plan_batch",
    "subspace_tasks",
]
