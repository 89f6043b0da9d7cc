"""Calibrated transfer in shared coordinates: module by module, teacher and student streamed layer by layer.

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
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import LoraAdapter
from ..errors import TransferError
from ..lowrank import frobenius_norm
from ..methods.base import importance_map, scatter_rows
from ..methods.calibrated import (
    Moments,
    calibrated_update,
    fit_error,
    heldout_errors,
    least_harmful,
    relative_fit_error,
)
from ..pairing import Pairing, Unit
from ..report import ModuleRecord, TransferReport, peak_rss_mb
from ..streaming import Stop, Stream, StreamedModel, make_chunks
from .accumulate import StageMoments
from .options import CalibrationOptions
from .text import read_calibration_lines, shared_tokenizer, tokenize_calibration

log = logging.getLogger(__name__)

RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
# Module roles in the order their inputs become available inside a decoder layer.
STAGES: dict[str, int] = {"attn.q": 0, "attn.k": 0, "attn.v": 0, "attn.o": 1, "mlp.gate": 2, "mlp.up": 2, "mlp.down": 3}

Part = tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]


# -- the calibration run ------------------------------------------------------------------


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

    def output_weight(self, settings: CalibrationOptions) -> float:
        return 0.0 if self.cross else settings.output_weight


def adapter_deltas(adapter: LoraAdapter, arch: Any, layer: int) -> dict[str, torch.Tensor]:
    """The adapter's updates of one decoder layer, as additions to the layer's parameters (float32)."""
    extra: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        parsed = arch.parse(module.name)
        if parsed is not None and parsed[0] == layer:
            dW = module.scale * (module.B.float() @ module.A.float())  # the layers run in float32
            extra[f"{parsed[1].suffix}.weight"] = dW.mT if arch.transposed else dW
    return extra


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
        settings: CalibrationOptions,
        report: TransferReport,
        progress: bool = True,
        device: str = "cpu",
    ) -> None:
        self.pairing, self.adapter, self.settings = pairing, adapter, settings
        self.report, self.progress = report, progress
        self.device = torch.device(device)
        self.folds = settings.folds
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
        return adapter_deltas(self.adapter, self.pairing.arch_s, layer)

    # -- the run ----------------------------------------------------------------------------
    def run(self, parts: list[Part]) -> list[Part]:
        """Refine ``parts`` (the init method's results); returns one ``(unit, record, B, A)`` per unit."""
        started = time.perf_counter()
        settings = self.settings
        self._check_layers()
        plans = self._plans(parts)
        tokenizer = shared_tokenizer(self.pairing.src, self.pairing.tgt)
        samples, name = read_calibration_lines(settings.text)
        ids = tokenize_calibration(samples, tokenizer, settings.samples, settings.max_tokens, name)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        chunks = make_chunks(ids, pad, settings.batch_size, self.folds)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        teacher = Stream(StreamedModel(self.pairing.src, self.pairing.arch_s, str(self.device)), chunks)
        student = Stream(StreamedModel(self.pairing.tgt, self.pairing.arch_t, str(self.device)), chunks)
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
        """Add the ported update to the student's weight, so downstream modules see it (nothing if left out)."""
        if plan.result is None:
            return
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
    ) -> StageMoments:
        """Moments of one stage: each chunk runs through the teacher, then the student, up to the stage's modules."""
        acc = StageMoments(self.folds, self.device, self.extra)
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

    def _solve(self, plan: _UnitPlan, acc: StageMoments, index: int) -> None:
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
        if settings.no_harm:
            self._no_harm(plan, acc, index, B0, A0, lam)

    def _no_harm(
        self, plan: _UnitPlan, acc: StageMoments, index: int, B0: torch.Tensor, A0: torch.Tensor, lam: float
    ) -> None:
        """Keep the port only if, fitted without each fold, it is closer to the teacher on that fold.

        The alternatives are leaving the module out and, where shapes match, the plain copy;
        the best of the three on held-out calibration text is kept (``plan.result = None``:
        left out), and the report says which and why.
        """
        beta, truncation = plan.output_weight(self.settings), self.settings.truncation

        def port(train: Moments) -> tuple[torch.Tensor, torch.Tensor]:
            f = calibrated_update(
                plan.B_s, plan.A_s, B0, A0, train, lam, plan.rank, truncation, scale=plan.scale, extra_weight=beta
            )
            return f.B, f.A

        candidates: dict[str, Any] = {"port": port}
        if plan.unit.source.shape == plan.unit.target.shape and not plan.cross:
            candidates["copy"] = lambda train: (plan.B_s, plan.A_s)
        folds = [acc.moments(index, [f]) for f in range(self.folds)]
        record = plan.record
        record.heldout = heldout_errors(folds, candidates, plan.B_s, scale=plan.scale, extra_weight=beta)
        best = least_harmful(record.heldout)
        if best == "copy":
            plan.result = (plan.B_s.float(), plan.A_s.float())
            record.decision = "fallback:identity"
            record.reason = (
                f"no-harm: the copy fits held-out text better (relative error {record.heldout['copy']:.3f} vs "
                f"{record.heldout['port']:.3f})"
            )
        elif best == "none":
            plan.result = None
            record.decision = "skipped"
            record.reason = (
                f"no-harm: leaving the module out fits held-out text better than the port "
                f"(relative error {record.heldout['port']:.3f})"
            )

    def _choose_ridge(
        self, plan: _UnitPlan, acc: StageMoments, index: int, B0: torch.Tensor, A0: torch.Tensor
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
