"""Calibrated transfer: stream unlabeled text through teacher and student, one layer at a time.

The teacher is the source base with the adapter merged; the student is the target base
with the adapters ported so far merged. Both run one decoder layer at a time
(:mod:`loraport.streaming`: weights on the ``meta`` device, each layer materialised from the
lazy checkpoint reader when it runs), GPTQ style: the hidden states of the calibration batch
advance layer by layer in both models, and for every adapted module only the moments of
:mod:`loraport.methods.calibrated` are kept (``X_t X_t^T`` and ``(A_s X_s) X_t^T``, plus
``Y X_t^T`` with output matching), never the token activations of more than one batch chunk.

Inside a layer the modules are solved in dependency order, so each sees the student's
inputs with every upstream port applied: q/k/v (the layer input), then o (after the ported
q/k/v), then gate/up (post-attention input), then down (after the ported gate/up). For each
stage, each chunk runs through the teacher's layer and then the student's, and both passes
stop (a hook raises) as soon as the stage's modules have been seen. Position embeddings and
attention masks come from each model's own forward pass (per layer: Gemma-2's sliding and
global masks), not from a re-implementation.

Modules whose output size differs between the models (another hidden or head size) cannot
match outputs token by token: for them the adapter's rows are moved to the target's output
coordinates by the subspace methods' importance pairing and only the adapter's contribution
is matched (``beta = 0`` for that module).

Memory: one decoder layer of each model, the hidden states of the calibration batch in both
models (``tokens x hidden`` each, float32), one chunk's activations, and the moments of one
stage (``n^2`` per distinct module input, ``r n`` per module; ``m n`` per module with output
matching). Time: per layer, up to four partial and one full pass of each model over the
calibration tokens, the Gram products (``tokens x n^2``) and one Cholesky factorisation per
distinct module input.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapters import LoraAdapter
from .checkpoints import Checkpoint
from .errors import LoraportError, TransferError
from .lowrank import frobenius_norm
from .methods.base import importance_map, scatter_rows
from .methods.calibrated import (
    Moments,
    calibrated_update,
    fit_error,
    relative_fit_error,
)
from .pairing import Pairing, Unit
from .report import ModuleRecord, TransferReport, peak_rss_mb
from .streaming import Stop, Stream, StreamedModel, add_product, layer_updates, make_chunks

log = logging.getLogger(__name__)

CALIBRATED = "calibrated"
INITS = ("auto", "identity", "project", "lorax", "procrustes", "prolora", "zero")
DEFAULT_RIDGE: float | str = 0.1
DEFAULT_OUTPUT_WEIGHT = 1.0
DEFAULT_INIT = "auto"
DEFAULT_SAMPLES = 256
DEFAULT_MAX_TOKENS = 128
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
UNKNOWN_LIMIT = 0.5
# Module roles in the order their inputs become available inside a decoder layer.
STAGES: dict[str, int] = {"attn.q": 0, "attn.k": 0, "attn.v": 0, "attn.o": 1, "mlp.gate": 2, "mlp.up": 2, "mlp.down": 3}

Part = tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]


# -- calibration text ---------------------------------------------------------------------


def read_calibration_lines(source: str | os.PathLike[str] | Sequence[str]) -> tuple[list[str], str]:
    """Samples from a text file (one per line, blank lines ignored) or a list of strings.

    Returns ``(samples, name)``; ``name`` is the file (or ``<list of N strings>``) for messages.

    Raises:
        LoraportError: missing file, binary content (NUL bytes or not UTF-8), no text.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise LoraportError(f"{name}: calibration file not found")
        data = path.read_bytes()
        if b"\x00" in data[: 1 << 20]:
            raise LoraportError(f"{name}: calibration file is binary (expected UTF-8 text, one sample per line)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LoraportError(
                f"{name}: calibration file is not UTF-8 text (byte {exc.start}); expected one sample per line"
            ) from None
        lines = [line.strip() for line in text.splitlines()]
    else:
        items = list(source)
        name = f"<list of {len(items)} strings>"
        if not all(isinstance(item, str) for item in items):
            raise LoraportError(f"calibration {name}: every item must be a string")
        lines = [item.strip() for item in items]
    samples = [line for line in lines if line]
    if not samples:
        raise LoraportError(f"{name}: no calibration text (expected one sample per line)")
    return samples, name


def tokenize_calibration(
    samples: Sequence[str], tokenizer: Any, max_samples: int, max_tokens: int, name: str
) -> list[list[int]]:
    """Token ids of the first ``max_samples`` samples, each cut to ``max_tokens``.

    Raises:
        LoraportError: when more than half of the tokens are the tokenizer's unknown token
            (text in another tokenizer's vocabulary), or when nothing is left.
    """
    chosen = list(samples[:max_samples])
    encoded = tokenizer(chosen, truncation=True, max_length=max_tokens)["input_ids"]
    ids = [list(row) for row in encoded if len(row) > 0]
    if not ids:
        raise LoraportError(f"{name}: the calibration text gives no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        total = sum(len(row) for row in ids)
        unknown = sum(row.count(unk) for row in ids)
        if unknown > UNKNOWN_LIMIT * total:
            raise LoraportError(
                f"{name}: {unknown / total:.0%} of the calibration tokens are unknown to the base models' "
                f"tokenizer (text for another tokenizer or language?)"
            )
    return ids


def shared_tokenizer(*checkpoints: Checkpoint, purpose: str = "calibrated transfer") -> Any:
    """The tokenizer of every model; an error unless their vocabularies are identical.

    Teacher and student (or the models RegMean runs) must see the same token ids for their
    activations to compare like with like; ``purpose`` names the caller in the error.
    """
    from transformers import AutoTokenizer

    tokenizers = []
    for ckpt in checkpoints:
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(str(ckpt.root), trust_remote_code=False))
        except Exception as exc:
            raise LoraportError(
                f"{ckpt.name}: {purpose} needs the tokenizer saved beside the base model ({exc})"
            ) from None
    first = tokenizers[0].get_vocab()
    for ckpt, tokenizer in zip(checkpoints[1:], tokenizers[1:], strict=True):
        vocab = tokenizer.get_vocab()
        if vocab != first:
            differ = len(set(first.items()) ^ set(vocab.items()))
            raise LoraportError(
                f"{purpose} needs the same tokenizer on every model: {checkpoints[0].name} ({len(first)} tokens) and "
                f"{ckpt.name} ({len(vocab)} tokens) differ in {differ} vocabulary entries"
            )
    return tokenizers[0]


# -- the calibration run ------------------------------------------------------------------


@dataclass
class CalibrationSettings:
    """What :func:`calibrate` needs from :class:`~loraport.transfer.TransferOptions`."""

    calibration: Any
    samples: int = DEFAULT_SAMPLES
    max_tokens: int = DEFAULT_MAX_TOKENS
    ridge: float | str = DEFAULT_RIDGE
    init: str = DEFAULT_INIT
    truncation: str = "rrr"
    output_weight: float = DEFAULT_OUTPUT_WEIGHT
    init_scale: str = "none"
    batch_size: int = 16
    folds: int = 2
    rank: int | None = None
    device: str = "cpu"

    @classmethod
    def from_options(cls, options: Any) -> CalibrationSettings:
        return cls(
            calibration=options.calibration,
            samples=options.calib_samples,
            max_tokens=options.calib_max_tokens,
            ridge=options.ridge,
            init=options.init,
            truncation=options.calib_truncation,
            output_weight=options.calib_output_weight,
            init_scale=options.calib_init_scale,
            batch_size=options.calib_batch_size,
            rank=options.calib_rank,
            device=options.device,
        )


def validate_settings(options: Any) -> None:
    """Check the calibrated-transfer fields of ``options`` (raises ``TransferError``)."""
    if options.calibration is None:
        raise TransferError("--method calibrated needs --calibration FILE (unlabeled text, one sample per line)")
    if options.init not in INITS:
        raise TransferError(f"--init must be one of {', '.join(INITS)}, got {options.init!r}")
    ridge = options.ridge
    if isinstance(ridge, str) and ridge != "auto":
        try:
            options.ridge = float(ridge)
        except ValueError:
            raise TransferError(f"--ridge must be a number >= 0 or 'auto', got {options.ridge!r}") from None
    if not isinstance(options.ridge, str) and not options.ridge >= 0:
        raise TransferError(f"--ridge must be >= 0 or 'auto', got {options.ridge!r}")
    if options.calib_rank is not None and options.calib_rank < 1:
        raise TransferError(f"calib_rank must be >= 1, got {options.calib_rank}")
    if options.calib_samples < 1 or options.calib_max_tokens < 1 or options.calib_batch_size < 1:
        raise TransferError("--calib-samples, --calib-max-tokens and the batch size must be >= 1")
    if options.calib_truncation not in ("rrr", "svd"):
        raise TransferError(f"calib_truncation must be rrr or svd, got {options.calib_truncation!r}")
    if options.calib_init_scale not in ("none", "fit"):
        raise TransferError(f"calib_init_scale must be none or fit, got {options.calib_init_scale!r}")
    read_calibration_lines(options.calibration)  # fail before any work on a bad file


@dataclass
class _UnitPlan:
    unit: Unit
    record: ModuleRecord
    B0: torch.Tensor  # (m, r0) init, source scale
    A0: torch.Tensor  # (r0, n_t)
    B_s: torch.Tensor  # (m, r) rows of this unit
    A_s: torch.Tensor  # (r, n_s)
    scale: float
    rank: int
    stage: int
    suffix_s: str
    suffix_t: str
    cross: bool = False  # output sizes differ: B_s is mapped to the target's rows, no output matching
    result: tuple[torch.Tensor, torch.Tensor] | None = None

    def output_weight(self, settings: CalibrationSettings) -> float:
        return 0.0 if self.cross else settings.output_weight


class _Accumulator:
    """Moments of one stage: Grams per distinct input, cross moments per unit, per fold."""

    def __init__(self, folds: int, device: torch.device, extra: bool) -> None:
        self.folds = folds
        self.device = device
        self.extra = extra
        self.grams: dict[str, list[torch.Tensor]] = {}
        self.group_of: dict[int, str] = {}  # plan index -> group key
        self.cross: dict[int, list[torch.Tensor]] = {}
        self.code_gram: dict[int, list[torch.Tensor]] = {}
        self.tokens: list[int] = [0] * folds
        self.target_cross: dict[int, list[torch.Tensor]] = {}
        self.target_code: dict[int, list[torch.Tensor]] = {}
        self.target_energy: dict[int, list[float]] = {}

    def add(
        self, index: int, group: str, fold: int, x: torch.Tensor, code: torch.Tensor, extra: torch.Tensor | None
    ) -> None:
        """``x: (T, n_t)`` student inputs, ``code: (T, r)`` teacher LoRA codes, ``extra: (T, m)``."""
        f64 = torch.float64
        if group not in self.grams:
            n = x.shape[1]
            self.grams[group] = [torch.zeros(n, n, dtype=f64, device=self.device) for _ in range(self.folds)]
        self.group_of[index] = group
        if index not in self.cross:
            r, n = code.shape[1], x.shape[1]
            self.cross[index] = [torch.zeros(r, n, dtype=f64, device=self.device) for _ in range(self.folds)]
            self.code_gram[index] = [torch.zeros(r, r, dtype=f64, device=self.device) for _ in range(self.folds)]
            if self.extra and extra is not None:
                m = extra.shape[1]
                self.target_cross[index] = [torch.zeros(m, n, dtype=f64, device=self.device) for _ in range(self.folds)]
                self.target_code[index] = [torch.zeros(r, m, dtype=f64, device=self.device) for _ in range(self.folds)]
                self.target_energy[index] = [0.0] * self.folds
        add_product(self.cross[index][fold], code, x)
        add_product(self.code_gram[index][fold], code, code)
        if self.extra and extra is not None:
            add_product(self.target_cross[index][fold], extra, x)
            add_product(self.target_code[index][fold], code, extra)
            self.target_energy[index][fold] += float(extra.square().sum(dtype=torch.float64))

    def add_gram(self, group: str, fold: int, x: torch.Tensor) -> None:
        add_product(self.grams[group][fold], x, x)

    def moments(self, index: int, folds: Iterable[int]) -> Moments:
        group = self.group_of[index]
        extra = self.extra and index in self.target_cross
        total = None
        for fold in folds:
            part = Moments(
                self.grams[group][fold],
                self.cross[index][fold],
                self.code_gram[index][fold],
                self.tokens[fold],
                self.target_cross[index][fold] if extra else None,
                self.target_energy[index][fold] if extra else 0.0,
                self.target_code[index][fold] if extra else None,
            )
            total = part if total is None else total + part
        assert total is not None
        return total


def _init_shrinkage(plan: _UnitPlan, stats: Moments) -> float:
    """Best scalar ``w`` in ``[0, 1]`` for ``w dW_0`` to reproduce ``dW_s X_s`` (similarity-aware init).

    ``w`` measures how well the init's effect on the student's inputs agrees with the
    adapter's on the teacher's (fitted on the adapter's contribution, also with output matching).
    """
    if plan.B0.shape[1] == 0:
        return 0.0
    B0, A0 = plan.B0.double(), plan.A0.double()
    energy = float(torch.sum((B0.mT @ B0) * (A0 @ stats.gram.double() @ A0.mT)))
    cross = float(torch.sum((B0.mT @ plan.B_s.double()) * (A0 @ stats.cross.double().mT)))
    return min(1.0, max(0.0, cross / energy)) if energy > 0 else 0.0


class Calibrator:
    """Runs the calibrated refinement of one port (see the module docstring)."""

    def __init__(
        self,
        pairing: Pairing,
        adapter: LoraAdapter,
        settings: CalibrationSettings,
        report: TransferReport,
        progress: bool = True,
    ) -> None:
        self.pairing, self.adapter, self.settings = pairing, adapter, settings
        self.report, self.progress = report, progress
        self.device = torch.device(settings.device)
        self.folds = settings.folds if settings.ridge == "auto" else 1
        self.extra = settings.output_weight != 0
        # Set to a dict to keep every unit's moments (keyed by target module [rows]): for tests.
        self.recorded: dict[str, Moments] | None = None

    # -- setup ----------------------------------------------------------------------------
    def _check_layers(self) -> None:
        layer_map = self.pairing.layer_map
        ordered = [layer_map[t] for t in sorted(layer_map)]
        if any(b < a for a, b in itertools.pairwise(ordered)):
            raise TransferError(
                "calibrated transfer needs a layer map whose source layers do not decrease with the target layer "
                f"(got {layer_map})"
            )

    def _plans(self, parts: list[Part]) -> list[_UnitPlan]:
        by_unit = {id(unit): (record, B, A) for unit, record, B, A in parts}
        records = self.report.records
        plans: list[_UnitPlan] = []
        for position, unit in enumerate(self.pairing.units):
            found = by_unit.get(id(unit))
            src_mod = unit.source_module
            rows = unit.source.rows
            B_s = src_mod.B if rows is None else src_mod.B[rows[0] : rows[1]]
            cross = unit.source.shape[0] != unit.target.shape[0]
            if cross:
                B_s = self._map_outputs(unit, B_s)
            if found is not None:
                record, B0, A0 = found
            else:
                record = records[position]
                B0 = torch.zeros(unit.target.shape[0], 0)
                A0 = torch.zeros(0, unit.target.shape[1])
                record.note = (record.note + "; " if record.note else "") + (
                    f"init {self.settings.init} gave nothing ({record.reason}): ridge toward zero"
                )
                record.decision, record.reason = "transferred", ""
            if cross:
                record.note = (record.note + "; " if record.note else "") + (
                    f"outputs {unit.source.shape[0]}->{unit.target.shape[0]} paired by importance: "
                    "the adapter's contribution is matched, not the whole output"
                )
            if self.settings.init == "zero":
                B0, A0 = B0[:, :0], A0[:0]
            parsed_s = self.pairing.arch_s.parse(unit.source.module)
            parsed_t = self.pairing.arch_t.parse(unit.target.module)
            assert parsed_s is not None and parsed_t is not None
            f64 = torch.float64
            plans.append(
                _UnitPlan(
                    unit,
                    record,
                    B0.to(self.device, f64),
                    A0.to(self.device, f64),
                    B_s.to(self.device, f64),
                    src_mod.A.to(self.device, f64),
                    src_mod.scale,
                    self.settings.rank or src_mod.rank,
                    STAGES.get(unit.role.split("+")[0], 0),
                    parsed_s[1].suffix,
                    parsed_t[1].suffix,
                    cross,
                )
            )
        return plans

    def _map_outputs(self, unit: Unit, B_s: torch.Tensor) -> torch.Tensor:
        """``B_s``'s rows moved to the target's output coordinates (:func:`~loraport.methods.base.importance_map`).

        Output sizes differ (another hidden or head size): the i-th strongest output row of
        the source base weight is paired with the i-th strongest of the target's, as the
        subspace methods' dimension adaptation does; unpaired target rows get nothing.
        """
        norms = []
        for ckpt, arch, side in (
            (self.pairing.src, self.pairing.arch_s, unit.source),
            (self.pairing.tgt, self.pairing.arch_t, unit.target),
        ):
            W = ckpt.get(side.key).float()
            W = W.mT if arch.transposed else W
            W = W if side.rows is None else W[side.rows[0] : side.rows[1]]
            norms.append(torch.linalg.vector_norm(W, dim=1))
        return scatter_rows(B_s, *importance_map(*norms), unit.target.shape[0])

    def _teacher_extra(self, layer: int) -> dict[str, torch.Tensor]:
        """The adapter's updates of one source layer, as additions to the layer's parameters."""
        return layer_updates(self.adapter, self.pairing.arch_s, layer)

    # -- the run ----------------------------------------------------------------------------
    def run(self, parts: list[Part]) -> list[Part]:
        """Refine ``parts`` (the init method's results); returns one ``(unit, record, B, A)`` per unit."""
        started = time.perf_counter()
        settings = self.settings
        self._check_layers()
        plans = self._plans(parts)
        tokenizer = shared_tokenizer(self.pairing.src, self.pairing.tgt)
        samples, name = read_calibration_lines(settings.calibration)
        ids = tokenize_calibration(samples, tokenizer, settings.samples, settings.max_tokens, name)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        chunks = make_chunks(ids, pad, settings.batch_size, self.folds)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        teacher = Stream(StreamedModel(self.pairing.src, self.pairing.arch_s, settings.device), chunks)
        student = Stream(StreamedModel(self.pairing.tgt, self.pairing.arch_t, settings.device), chunks)
        by_layer: dict[int, list[_UnitPlan]] = {}
        for plan in plans:
            by_layer.setdefault(plan.unit.target.layer, []).append(plan)
        bar = tqdm(
            range(self.pairing.layers_t),
            desc="loraport calibrated",
            unit="layer",
            file=sys.stderr,
            disable=not self.progress,
        )
        for t_layer in bar:
            members = by_layer.get(t_layer, [])
            student_layer = student.model.load_layer(t_layer)
            if members:
                s_layer = self.pairing.layer_map[t_layer]
                self._advance_teacher(teacher, s_layer)
                teacher_layer = teacher.model.load_layer(s_layer, self._teacher_extra(s_layer))
                for stage in sorted({p.stage for p in members}):
                    bar.set_postfix_str(f"stage {stage}")
                    stage_plans = [p for p in members if p.stage == stage]
                    acc = self._accumulate(teacher, teacher_layer, student, student_layer, stage_plans)
                    for index, plan in enumerate(stage_plans):
                        self._solve(plan, acc, index)
                        self._merge(student_layer, plan)
                    del acc  # before the next stage's moments exist (gate/up's dense moments: 2 x 110 MB)
                teacher.model.release_layer(s_layer)
            student.advance(student_layer)
            student.model.release_layer(t_layer)
        tokens = sum(c.tokens for c in chunks)
        stats: dict[str, Any] = {
            "source": name,
            "samples": len(ids),
            "tokens": tokens,
            "seconds": time.perf_counter() - started,
            "peak_rss_mb": peak_rss_mb(),
        }
        if self.device.type == "cuda":
            stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.report.calibration = stats
        self.report.notes.append(
            f"calibrated on {len(ids)} sample(s), {tokens} token(s) from {name} (ridge {settings.ridge}, init "
            f"{settings.init}, {settings.truncation} truncation, output weight {settings.output_weight}) in "
            f"{stats['seconds']:.1f} s"
        )
        return [(p.unit, p.record, *p.result) for p in plans if p.result is not None]

    def _advance_teacher(self, teacher: Stream, s_layer: int) -> None:
        while teacher.index < s_layer:
            index = teacher.index
            teacher.advance(teacher.model.load_layer(index, self._teacher_extra(index)))
            teacher.model.release_layer(index)

    def _merge(self, layer: torch.nn.Module, plan: _UnitPlan) -> None:
        """Add the ported update to the student's weight, so downstream modules see it."""
        assert plan.result is not None
        B, A = plan.result
        module = layer.get_submodule(plan.suffix_t)
        delta = (plan.scale * (B.double() @ A.double())).to(module.weight)
        rows = plan.unit.target.rows
        transposed = self.pairing.arch_t.transposed
        with torch.no_grad():
            if rows is None:
                module.weight.add_(delta.mT if transposed else delta)
            elif transposed:
                module.weight[:, rows[0] : rows[1]] += delta.mT
            else:
                module.weight[rows[0] : rows[1]] += delta

    def _accumulate(
        self,
        teacher: Stream,
        teacher_layer: torch.nn.Module,
        student: Stream,
        student_layer: torch.nn.Module,
        stage_plans: list[_UnitPlan],
    ) -> _Accumulator:
        """Moments of one stage: each chunk runs through the teacher, then the student, up to the stage's modules."""
        acc = _Accumulator(self.folds, self.device, self.extra)
        captured: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # source suffix -> (code, base output)
        groups: dict[tuple[int, tuple[int, ...]], str] = {}
        seen: set[str] = set()
        source_suffixes = sorted({p.suffix_s for p in stage_plans})
        target_suffixes = sorted({p.suffix_t for p in stage_plans})
        handles = []
        for suffix in source_suffixes:
            module = self.adapter.modules[next(p.unit.source.module for p in stage_plans if p.suffix_s == suffix)]
            A_s = module.A.to(self.device, torch.float32)
            sB = (module.scale * module.B).to(self.device, torch.float32)

            def t_hook(mod: Any, args: tuple[Any, ...], out: Any, suffix: str = suffix, A_s=A_s, sB=sB) -> None:
                chunk = teacher.chunks[teacher.current]
                code = chunk.flat(args[0]).float() @ A_s.mT
                # Output matching needs the teacher's base output: (W_s + s B A) x + b - s B (A x).
                base = chunk.flat(out).float() - code @ sB.mT if self.extra else None
                captured[suffix] = (code, base)
                if len(captured) == len(source_suffixes):
                    raise Stop

            handles.append(teacher_layer.get_submodule(suffix).register_forward_hook(t_hook))
        for suffix in target_suffixes:
            indices = [i for i, p in enumerate(stage_plans) if p.suffix_t == suffix]

            def s_hook(mod: Any, args: tuple[Any, ...], suffix: str = suffix, indices: list[int] = indices) -> None:
                chunk = student.chunks[student.current]
                x_full = args[0]
                x = chunk.flat(x_full).float()
                # Modules fed by the same tensor (q, k, v; gate, up) share one Gram matrix.
                key = (x_full.data_ptr(), tuple(x_full.shape))
                first = key not in groups
                group = groups.setdefault(key, suffix)
                for i in indices:
                    plan = stage_plans[i]
                    code, base_s = captured[plan.suffix_s]
                    target = None
                    if self.extra and not plan.cross:
                        assert base_s is not None
                        if plan.unit.source.rows is not None:
                            base_s = base_s[:, plan.unit.source.rows[0] : plan.unit.source.rows[1]]
                        target = base_s - torch.nn.functional.linear(x, *self._linear_params(mod, plan))
                    acc.add(i, group, chunk.fold, x, code, target)
                if first:
                    acc.add_gram(group, chunk.fold, x)
                seen.add(suffix)
                if len(seen) == len(target_suffixes):
                    raise Stop

            handles.append(student_layer.get_submodule(suffix).register_forward_pre_hook(s_hook))
        try:
            for c, chunk in enumerate(student.chunks):
                captured.clear()
                seen.clear()
                groups.clear()
                teacher.run_chunk(teacher_layer, teacher.index, c)
                student.run_chunk(student_layer, student.index, c)
                acc.tokens[chunk.fold] += chunk.tokens
        finally:
            for handle in handles:
                handle.remove()
        return acc

    def _linear_params(self, module: torch.nn.Module, plan: _UnitPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b)`` of the (part of the) student's module, in Linear layout."""
        W = module.weight.float()
        if self.pairing.arch_t.transposed:
            W = W.mT
        bias = module.bias.float() if getattr(module, "bias", None) is not None else None
        rows = plan.unit.target.rows
        if rows is not None:
            W = W[rows[0] : rows[1]]
            bias = bias[rows[0] : rows[1]] if bias is not None else None
        return W, bias

    def _solve(self, plan: _UnitPlan, acc: _Accumulator, index: int) -> None:
        settings = self.settings
        beta = plan.output_weight(settings)
        stats = acc.moments(index, range(self.folds))
        if self.recorded is not None:
            self.recorded[plan.record.target_module] = stats
        B0, A0 = plan.B0, plan.A0
        notes = []
        if settings.init_scale == "fit":
            shrink = _init_shrinkage(plan, stats)
            B0 = B0 * shrink
            notes.append(f"init scaled by {shrink:.3f}")
        lam: float
        if settings.ridge == "auto":
            lam, held_out = self._choose_ridge(plan, acc, index, B0, A0)
            notes.append(f"held-out fit {held_out:.3f}")
        else:
            lam = float(settings.ridge)
        factors = calibrated_update(
            plan.B_s, plan.A_s, B0, A0, stats, lam, plan.rank, settings.truncation, scale=plan.scale, extra_weight=beta
        )
        plan.result = (factors.B.float(), factors.A.float())
        record = plan.record

        def fit(B: torch.Tensor, A: torch.Tensor) -> float:
            return relative_fit_error(B, A, plan.B_s, stats, scale=plan.scale, extra_weight=beta)

        record.ridge, record.ridge_abs, record.calib_tokens = lam, factors.lam_prime, sum(acc.tokens)
        record.source_norm = plan.scale * frobenius_norm(plan.B_s, plan.A_s)
        record.target_norm = plan.scale * frobenius_norm(factors.B, factors.A)
        record.kept_energy = record.target_norm / record.source_norm if record.source_norm > 0 else 0.0
        record.fit_before = fit(B0, A0)
        same = plan.unit.source.shape == plan.unit.target.shape
        record.fit_copy = fit(plan.B_s, plan.A_s) if same else None
        record.fit_after = fit(factors.B, factors.A)
        if notes:
            record.note = "; ".join(filter(None, [record.note, *notes]))

    def _choose_ridge(
        self, plan: _UnitPlan, acc: _Accumulator, index: int, B0: torch.Tensor, A0: torch.Tensor
    ) -> tuple[float, float]:
        """The grid value with the lowest held-out fit error (k-fold over samples, rank-truncated solutions)."""
        beta, truncation = plan.output_weight(self.settings), self.settings.truncation
        folds = [
            (acc.moments(index, [f]), acc.moments(index, [g for g in range(self.folds) if g != f]))
            for f in range(self.folds)
        ]
        best, best_error, best_target = RIDGE_GRID[0], math.inf, 0.0
        for lam in RIDGE_GRID:
            error = target = 0.0
            for held, train in folds:
                f = calibrated_update(
                    plan.B_s, plan.A_s, B0, A0, train, lam, plan.rank, truncation, scale=plan.scale, extra_weight=beta
                )
                e, t = fit_error(f.B, f.A, plan.B_s, held, scale=plan.scale, extra_weight=beta)
                error, target = error + e, target + t
            if error < best_error:
                best, best_error, best_target = lam, error, target
        return best, best_error / best_target if best_target > 0 else 0.0


def calibrate(
    parts: list[Part],
    pairing: Pairing,
    adapter: LoraAdapter,
    options: Any,
    report: TransferReport,
    progress: bool = True,
) -> list[Part]:
    """Refine the init method's per-unit results by calibration (``options.method == "calibrated"``).

    Args:
        parts: ``(unit, record, B, A)`` from the init method, in target coordinates, source scale.
        pairing / adapter: the port's module pairing and source adapter.
        options: the :class:`~loraport.transfer.TransferOptions`.
        report: gets per-module calibration fields and a ``calibration`` summary.

    Returns:
        The refined ``(unit, record, B, A)``, one per paired unit.
    """
    return Calibrator(pairing, adapter, CalibrationSettings.from_options(options), report, progress).run(parts)


__all__ = [
    "CALIBRATED",
    "DEFAULT_INIT",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_OUTPUT_WEIGHT",
    "DEFAULT_RIDGE",
    "DEFAULT_SAMPLES",
    "INITS",
    "CalibrationSettings",
    "Calibrator",
    "calibrate",
    "read_calibration_lines",
    "shared_tokenizer",
    "tokenize_calibration",
    "validate_settings",
]
