"""Calibrated transfer between models that share no coordinates (``mode="mapped"``).

Another tokenizer, other widths and depth, independent training: no source module has a
target module whose inputs and outputs mean the same thing, so the adapter is not ported
module by module. What is carried over is its *effect on the residual stream*:

1. **Positions.** Each calibration line is tokenized by both models; positions whose tokens
   end at the same character are aligned (:func:`~loraport.calibrate.text.align_calibration`).
   Every statistic below is summed over aligned positions only.
2. **Depths.** Target layer ``t`` is paired with source layer ``s(t)`` by linear CKA between
   the two base models' layer outputs over a sample of aligned positions, with an
   order-preserving assignment (``depth="cka"``), or by relative depth.
3. **Maps.** Four streams advance layer by layer (GPTQ style, one layer of each model in
   memory): the source base ``SB``, the teacher ``ST`` (source + adapter), the target base
   ``TB`` and the student ``SU`` (target + what has been ported). At each paired depth a map
   ``M_t: (d_t, d_s)`` is fitted from ``SB``'s to ``TB``'s layer outputs
   (:func:`~loraport.calibrate.maps.fit_map`; its held-out ``R^2`` is reported).
4. **Target.** The student's output of layer ``t`` should be the target base's plus the
   adapter's effect mapped into target coordinates:
   ``D_t = TB_t + M_t (ST_s(t) - SB_s(t))``. The effect is cumulative: it includes what
   every source layer up to ``s(t)`` did, so source layers with no target partner are not
   lost, and errors of earlier target layers are corrected later.
5. **Writers.** The residual-writing modules of target layer ``t`` (``o`` then ``down``,
   or ``down`` only) are fitted, one after the other, so the student's layer output moves
   from where it is toward ``D_t``: ``min ||dW X - Y||^2 + lam' ||dW||^2`` at rank ``r``, with
   ``X`` the module's inputs in the student and ``Y = D_t - h`` (``h`` the student's layer
   output before this module's port) expressed in the module's output coordinates. Where the
   family normalises a module's output before adding it to the residual stream (Gemma 2/3),
   ``Y`` is divided by that norm's gain ``g / rms(z)`` (its linearisation at the student's
   output ``z``; the norm's rescaling term is neglected and corrected by later stages).
   The q/k/v/gate/up adapters' effects arrive through the writers of their layer.
6. **No harm.** Each writer's port is fitted without each calibration fold and scored on it;
   it is kept only when it brings the student closer to ``D_t`` than leaving it out. Then, where
   harm shows: on calibration lines held out from the fit, the port must change the target's
   next-token predictions as the adapter changes the source's (:mod:`~loraport.calibrate.effect`);
   the layers whose writers move them away are left out, and everything when even the rest does
   no better than nothing (the report says to use ``distill``).
"""

from __future__ import annotations

import functools
import logging
import operator
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import LoraAdapter, LoraModule
from ..alignment import token_texts
from ..architectures import relative_layer_map
from ..errors import TransferError
from ..lowrank import frobenius_norm
from ..methods.calibrated import (
    Moments,
    calibrated_update,
    fit_error,
    heldout_errors,
    least_harmful,
    ridge_lambda,
)
from ..pairing import Pairing, Side, Unit
from ..report import ModuleRecord, TransferReport, peak_rss_mb
from ..streaming import Chunk, Stream, StreamedModel
from .accumulate import GRAM_DTYPE, add_product
from .effect import leave_out_harm
from .maps import MapMoments, OutputAnchor, centered_gram, fit_map, linear_cka, map_r2, monotone_pairing
from .options import CalibrationOptions
from .shared import Part, adapter_deltas
from .text import AlignedSample, align_calibration, base_tokenizers, read_calibration_lines

log = logging.getLogger(__name__)

WRITER_ROLES = {"o,down": ("attn.o", "mlp.down"), "down": ("mlp.down",)}
CKA_POSITIONS = 1024  # aligned positions used to pair depths
UNRELATED_R2 = 0.3  # mean held-out R^2 of the maps below which the models are called unrelated
MIN_CHECK_LINES, MAX_CHECK_LINES = 10, 64  # calibration lines held out to judge the port's effect
F64 = torch.float64


@dataclass
class PairedChunk:
    """One batch of samples in both tokenizations, and its aligned positions (flat indices, same order)."""

    source: Chunk
    target: Chunk
    source_index: torch.Tensor
    target_index: torch.Tensor
    fold: int

    @property
    def positions(self) -> int:
        return int(self.target_index.numel())


def make_paired_chunks(
    samples: list[AlignedSample], pad_s: int, pad_t: int, batch_size: int = 16, folds: int = 2
) -> list[PairedChunk]:
    """Fold-homogeneous batches (sample ``i`` in fold ``i % folds``) holding the same samples on both sides."""
    chunks: list[PairedChunk] = []
    for fold in range(folds):
        members = sorted((a for i, a in enumerate(samples) if i % folds == fold), key=lambda a: len(a.target_ids))
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            source = Chunk.padded([a.source_ids for a in batch], pad_s, fold)
            target = Chunk.padded([a.target_ids for a in batch], pad_t, fold)
            w_s, w_t = source.ids.shape[1], target.ids.shape[1]
            s_index = [row * w_s + i_s for row, a in enumerate(batch) for i_s, _ in a.pairs]
            t_index = [row * w_t + i_t for row, a in enumerate(batch) for _, i_t in a.pairs]
            chunks.append(
                PairedChunk(source, target, torch.tensor(s_index), torch.tensor(t_index, dtype=torch.long), fold)
            )
    return chunks


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a ``(b, L, d)`` activation flattened to ``(b L, d)``, float32."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index.to(x.device)).float()


def _norm_gain(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per position and feature, the gain ``g / rms(z)`` of a norm that mapped ``z`` to ``y = g z / rms(z)``.

    ``g`` is estimated per feature by least squares over the positions (exact for an RMS
    norm), so features where ``z`` is near zero do not divide by zero; gains near zero are
    bounded below at 1e-3 of the mean gain.
    """
    rms = z.square().mean(-1, keepdim=True).sqrt().clamp(min=1e-12)
    u = z / rms
    g = (y * u).sum(0) / u.square().sum(0).clamp(min=1e-12)
    floor = 1e-3 * float(g.abs().mean().clamp(min=1e-12))
    g = torch.where(g.abs() < floor, torch.full_like(g, floor), g)
    return g / rms


class _WriterMoments:
    """Per fold: ``X X^T``, ``Y X^T``, ``||Y||^2`` and the token count of one writer module."""

    def __init__(self, folds: int, m: int, n: int, device: torch.device) -> None:
        self.gram = [torch.zeros(n, n, dtype=GRAM_DTYPE, device=device) for _ in range(folds)]
        self.cross = [torch.zeros(m, n, dtype=F64, device=device) for _ in range(folds)]
        self.energy = [0.0] * folds
        self.tokens = [0] * folds

    def add(self, fold: int, X: torch.Tensor, Y: torch.Tensor) -> None:
        add_product(self.gram[fold], X, X)
        add_product(self.cross[fold], Y, X)
        self.energy[fold] += float(Y.square().sum(dtype=F64))
        self.tokens[fold] += int(X.shape[0])

    def moments(self, fold: int) -> Moments:
        """:class:`Moments` of one fold's pure output regression (no source factors: ``r_s = 0``; no copies)."""
        gram, cross = self.gram[fold], self.cross[fold]
        m, n = cross.shape
        return Moments(
            gram, gram.new_zeros(0, n), gram.new_zeros(0, 0), self.tokens[fold], cross, self.energy[fold],
            gram.new_zeros(0, m),
        )  # fmt: skip


_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_norm")


@dataclass
class _Readout:
    """How a model reads out tokens: its output-head tensor, the final norm's gain, its vocabulary."""

    ckpt: Any
    key: str
    gain: torch.Tensor | None  # (d,)
    vocab: dict[str, int]  # token text -> row

    def rows(self, ids: list[int], device: torch.device) -> torch.Tensor:
        """Head rows ``ids`` (in that order) times the gain, reading only the spans that hold them."""
        order = torch.tensor(ids)
        unique, inverse = torch.unique(order, return_inverse=True)
        rows = self.ckpt.get_rows(self.key, unique).to(device, torch.float32)[inverse.to(device)]
        return rows * self.gain.to(device) if self.gain is not None else rows


def output_readout(ckpt: Any, tokenizer: Any, device: torch.device) -> _Readout:
    """The model's output-head tensor, its final norm's per-feature gain, and its vocabulary by token text.

    The gain is read by running the final norm (its weights loaded from the checkpoint) on
    ``+-1`` probes, so Gemma's ``1 + w`` convention, plain RMS norms and LayerNorms all come out right.
    """
    from transformers import AutoModelForCausalLM

    from ..checkpoints.meta import parameters_on_meta
    from ..streaming import resolve_key

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(ckpt.transformers_config())
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    head = model.get_output_embeddings()
    key = resolve_key(ckpt, names[id(head.weight)])
    if key is None:  # tied to the input embeddings
        key = resolve_key(ckpt, names[id(model.get_input_embeddings().weight)])
    if key is None:
        raise TransferError(f"{ckpt.name}: no output head or input embeddings to read the vocabulary from")
    vocab_rows = ckpt.shape(key)[0]
    gain = None
    decoder = model.get_decoder()
    norm = next((getattr(decoder, n) for n in _FINAL_NORMS if hasattr(decoder, n)), None)
    if norm is not None:
        for leaf, param in list(norm.named_parameters()):
            found = resolve_key(ckpt, names[id(param)])
            if found is None:
                raise TransferError(f"{ckpt.name}: no tensor for the final norm's {leaf}")
            norm._parameters[leaf] = torch.nn.Parameter(ckpt.get(found).to(device, torch.float32), requires_grad=False)
        probe = torch.ones(1, ckpt.shape(key)[1], device=device)
        probe[:, 1::2] = -1
        with torch.no_grad():
            gain = (norm(probe) - norm(-probe))[0] / (2 * probe[0])
    vocab = token_texts(tokenizer, vocab_rows)
    return _Readout(ckpt, key, gain, vocab)


def output_anchor(src: Any, tgt: Any, tokenizer_s: Any, tokenizer_t: Any, device: torch.device) -> OutputAnchor:
    """The :class:`~loraport.calibrate.maps.OutputAnchor` over the tokens both vocabularies spell the same way."""
    readout_s = output_readout(src, tokenizer_s, device)
    readout_t = output_readout(tgt, tokenizer_t, device)
    shared = sorted(set(readout_s.vocab) & set(readout_t.vocab))
    if not shared:
        raise TransferError("the two vocabularies share no token: no output anchor")
    P = readout_t.rows([readout_t.vocab[t] for t in shared], device)
    Q = readout_s.rows([readout_s.vocab[t] for t in shared], device)
    return OutputAnchor.from_heads(P, Q)


class MappedCalibrator:
    """Runs a ``mapped`` calibrated port (see the module docstring)."""

    def __init__(
        self,
        pairing: Pairing,
        adapter: LoraAdapter,
        options: CalibrationOptions,
        report: TransferReport,
        progress: bool = True,
        device: str = "cpu",
    ) -> None:
        self.pairing, self.adapter, self.options = pairing, adapter, options
        self.report, self.progress = report, progress
        self.device = torch.device(device)
        self.folds = options.folds
        self.roles = WRITER_ROLES[options.writers]
        self.rank = options.rank or max(m.rank for m in adapter.modules.values())
        self.anchor: OutputAnchor | None = None
        self.check_samples: list[AlignedSample] = []
        self.tokenizers: tuple[Any, Any] = (None, None)
        self.effect: dict[str, Any] | None = None
        first = next(iter(adapter.modules.values()))
        self.alpha, self.use_rslora = first.alpha, first.use_rslora
        for role in self.roles:
            found = pairing.arch_t.locate(role)
            if found is None or found[0].fused:
                raise TransferError(
                    f"calibrated (mapped): the target architecture {pairing.arch_t.name} has no plain {role} module"
                )

    # -- setup ------------------------------------------------------------------------------
    def _chunks(self) -> tuple[list[PairedChunk], float, str]:
        options = self.options
        tokenizer_s, tokenizer_t = base_tokenizers(self.pairing.src, self.pairing.tgt)
        if options.anchor > 0 and options.map == "ridge":
            self.anchor = output_anchor(self.pairing.src, self.pairing.tgt, tokenizer_s, tokenizer_t, self.device)
        samples, name = read_calibration_lines(options.text)
        aligned, share = align_calibration(
            samples, tokenizer_s, tokenizer_t, options.samples, options.max_tokens, name, options.min_aligned
        )
        self.tokenizers = (tokenizer_s, tokenizer_t)
        if options.no_harm and len(aligned) >= MIN_CHECK_LINES:  # held out from the fit, to judge its effect
            held = max(MIN_CHECK_LINES // 2, min(MAX_CHECK_LINES, len(aligned) // 5))
            aligned, self.check_samples = aligned[:-held], aligned[-held:]
        pad_s = tokenizer_s.pad_token_id if tokenizer_s.pad_token_id is not None else 0
        pad_t = tokenizer_t.pad_token_id if tokenizer_t.pad_token_id is not None else 0
        return make_paired_chunks(aligned, pad_s, pad_t, options.batch_size, self.folds), share, name

    def _stream(self, source: bool, chunks: list[PairedChunk]) -> Stream:
        ckpt, arch = (self.pairing.src, self.pairing.arch_s) if source else (self.pairing.tgt, self.pairing.arch_t)
        model = StreamedModel(ckpt, arch, str(self.device))
        return Stream(model, [c.source if source else c.target for c in chunks])

    def _advance(self, stream: Stream, extra: bool = False) -> None:
        """Run ``stream``'s next layer (the source's with the adapter merged when ``extra``)."""
        index = stream.index
        deltas = adapter_deltas(self.adapter, self.pairing.arch_s, index) if extra else None
        stream.advance(stream.model.load_layer(index, deltas))
        stream.model.release_layer(index)

    def _depth_pairing(self, chunks: list[PairedChunk]) -> tuple[dict[int, int], torch.Tensor | None]:
        """Target layer -> source layer, and the CKA matrix ``(L_s, L_t)`` when depth is ``cka``."""
        L_s, L_t = self.pairing.layers_s, self.pairing.layers_t
        if self.options.depth == "relative":
            return relative_layer_map(L_s, L_t), None
        subset, positions = [], 0
        for chunk in chunks:  # the first chunks holding CKA_POSITIONS aligned positions
            subset.append(chunk)
            positions += chunk.positions
            if positions >= CKA_POSITIONS:
                break
        grams: list[list[torch.Tensor]] = [[], []]
        for side, source in ((0, True), (1, False)):
            stream = self._stream(source, subset)
            for _ in range(L_s if source else L_t):
                self._advance(stream)
                states = [
                    _rows(stream.states[c], chunk.source_index if source else chunk.target_index)
                    for c, chunk in enumerate(subset)
                ]
                H = torch.cat(states)[:CKA_POSITIONS]
                grams[side].append(centered_gram(H).float())
            del stream
        cka = torch.tensor([[linear_cka(K_s.double(), K_t.double()) for K_t in grams[1]] for K_s in grams[0]])
        return monotone_pairing(cka), cka

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> list[Part]:
        started = time.perf_counter()
        chunks, share, name = self._chunks()
        layer_map, cka = self._depth_pairing(chunks)
        self.report.layer_map = dict(layer_map)
        source_base, teacher = self._stream(True, chunks), self._stream(True, chunks)
        target_base, student = self._stream(False, chunks), self._stream(False, chunks)
        results: list[Part] = []
        layers: list[dict[str, Any]] = []
        bar = tqdm(
            range(self.pairing.layers_t),
            desc="loraport calibrated (mapped)",
            unit="layer",
            file=sys.stderr,
            disable=not self.progress,
        )
        for t in bar:
            s = layer_map[t]
            while source_base.index <= s:
                self._advance(source_base)
                self._advance(teacher, extra=True)
            self._advance(target_base)
            M, r2 = self._fit_map(chunks, source_base, target_base, t)
            desired = [
                _rows(target_base.states[c], chunk.target_index)
                + (_rows(teacher.states[c], chunk.source_index) - _rows(source_base.states[c], chunk.source_index))
                @ M.mT
                for c, chunk in enumerate(chunks)
            ]
            layer = student.model.load_layer(t)
            info: dict[str, Any] = {"target": t, "source": s, "map_r2": r2}
            if cka is not None:
                info["cka"] = float(cka[s, t])
            for role in self.roles:
                bar.set_postfix_str(role)
                part = self._fit_writer(layer, t, s, role, chunks, student, desired, info)
                if part is not None:
                    results.append(part)
            layers.append(info)
            student.advance(layer)
            student.model.release_layer(t)
            del desired
        del source_base, teacher, target_base, student
        if self.check_samples:
            results = self._effect_check(results)
        self._summarise(layers, share, name, chunks, started)
        return results

    def _effect_check(self, results: list[Part]) -> list[Part]:
        """Leave out the layers whose writers do harm on held-out text (:func:`.effect.leave_out_harm`)."""
        kept, self.effect, warning = leave_out_harm(
            self.pairing, self.adapter, results, self.check_samples, self.tokenizers, self.device
        )
        if warning:
            self.report.notes.append(warning)
            log.warning(warning)
        return kept

    def _fit_map(self, chunks: list[PairedChunk], source: Stream, target: Stream, t: int) -> tuple[torch.Tensor, float]:
        """The map from the source's to the target's current states, and its mean held-out ``R^2`` over folds."""
        d_s, d_t = source.states[0].shape[-1], target.states[0].shape[-1]
        per_fold = [MapMoments.zeros(d_s, d_t, self.device) for _ in range(self.folds)]
        for c, chunk in enumerate(chunks):
            per_fold[chunk.fold].add(
                _rows(source.states[c], chunk.source_index), _rows(target.states[c], chunk.target_index)
            )
        options = self.options
        anchored = options.anchor_layers == "all" or t == self.pairing.layers_t - 1
        weight = options.anchor if anchored and self.anchor is not None else 0.0

        def fit(moments: MapMoments) -> torch.Tensor:
            return fit_map(moments, options.map, options.map_ridge, self.anchor, weight, moments.rms_ratio)

        scores = []
        for held in range(self.folds):
            train = [per_fold[f] for f in range(self.folds) if f != held]
            scores.append(map_r2(fit(sum(train[1:], train[0])), per_fold[held]))
        M = fit(sum(per_fold[1:], per_fold[0]))
        return M.float(), float(sum(scores) / len(scores))

    def _fit_writer(
        self,
        layer: torch.nn.Module,
        t: int,
        s: int,
        role: str,
        chunks: list[PairedChunk],
        student: Stream,
        desired: list[torch.Tensor],
        info: dict[str, Any],
    ) -> Part | None:
        """Fit one residual-writing module of student layer ``t`` toward ``desired``; merge it if kept."""
        arch = self.pairing.arch_t
        spec, _ = arch.locate(role)  # type: ignore[misc]
        module = layer.get_submodule(spec.suffix)
        post_name = arch.post_norms.get(role)
        post = layer.get_submodule(post_name) if post_name else None
        weight = module.weight
        m, n = (weight.shape[1], weight.shape[0]) if arch.transposed else tuple(weight.shape)
        acc = _WriterMoments(self.folds, m, n, self.device)
        captured: dict[str, torch.Tensor] = {}
        current: list[PairedChunk] = []

        def take_input(mod: Any, args: tuple[Any, ...]) -> None:
            captured["x"] = _rows(args[0], current[0].target_index)

        def take_norm(mod: Any, args: tuple[Any, ...], out: Any) -> None:
            captured["z"] = _rows(args[0], current[0].target_index)
            captured["y"] = _rows(out, current[0].target_index)

        handles = [module.register_forward_pre_hook(take_input)]
        if post is not None:
            handles.append(post.register_forward_hook(take_norm))
        try:
            for c, chunk in enumerate(chunks):
                current[:] = [chunk]
                captured.clear()
                out = student.run_chunk(layer, t, c)
                assert out is not None
                Y = desired[c] - _rows(out, chunk.target_index)
                if post is not None:
                    Y = Y / _norm_gain(captured["z"], captured["y"])
                acc.add(chunk.fold, captured["x"], Y)
        finally:
            for handle in handles:
                handle.remove()
        return self._solve(layer, module, t, s, role, spec.suffix, acc, (m, n), info)

    def _solve(
        self,
        layer: torch.nn.Module,
        module: torch.nn.Module,
        t: int,
        s: int,
        role: str,
        suffix: str,
        acc: _WriterMoments,
        shape: tuple[int, int],
        info: dict[str, Any],
    ) -> Part | None:
        options, folds = self.options, list(range(self.folds))
        lam = 0.1 if options.ridge == "auto" else float(options.ridge)
        m, n = shape
        no_B, no_A = torch.zeros(m, 0, dtype=F64, device=self.device), torch.zeros(0, n, dtype=F64, device=self.device)

        def solve(stats: Moments, **kwargs: Any) -> Any:
            return calibrated_update(
                no_B, no_A, no_B, no_A, stats, lam, self.rank, options.truncation, extra_weight=1.0, **kwargs
            )

        fold_stats = [acc.moments(f) for f in folds]
        # The fit on every fold, its Cholesky factor computed in place in one float64 buffer
        # (n = 9216: 680 MB; the per-fold Grams are float32).
        chol = torch.zeros_like(fold_stats[0].gram, dtype=F64)
        for fold in fold_stats:
            chol += fold.gram
        lam_prime = ridge_lambda(chol, lam)
        chol.diagonal().add_(lam_prime)
        info_code = torch.empty((), dtype=torch.int32, device=chol.device)
        torch.linalg.cholesky_ex(chol, out=(chol, info_code))
        if int(info_code) != 0:
            raise TransferError(f"calibrated (mapped): the inputs of {suffix} in layer {t} are degenerate")
        total = Moments(
            chol,  # not read by the solve (chol and lam_prime are given)
            fold_stats[0].cross,
            fold_stats[0].code_gram,
            sum(f.tokens for f in fold_stats),
            functools.reduce(operator.add, [f.target_cross for f in fold_stats]),
            sum(f.target_energy for f in fold_stats),
            fold_stats[0].target_code,
        )
        factors = solve(total, chol=chol, lam_prime=lam_prime)
        del total, chol
        name = self.pairing.arch_t.module_name(t, suffix)
        record = ModuleRecord(f"(adapter effect through source layer {s}, mapped)", name, role, s, t, (m, n), (m, n))
        record.ridge, record.ridge_abs = lam, factors.lam_prime
        record.calib_tokens = sum(fold.tokens for fold in fold_stats)
        parts = [fit_error(factors.B, factors.A, no_B, fold, extra_weight=1.0) for fold in fold_stats]
        error, target = sum(p[0] for p in parts), sum(p[1] for p in parts)
        record.fit_before, record.fit_after = 1.0, error / target if target > 0 else 0.0
        record.note = f"map R^2 {info['map_r2']:.3f}" + (f", CKA {info['cka']:.3f}" if "cka" in info else "")
        record.heldout = heldout_errors(
            fold_stats, {"port": lambda train: _factors(solve(train))}, no_B, extra_weight=1.0
        )
        info[f"{role}_fit"] = record.fit_after
        self.report.records.append(record)
        if options.no_harm and least_harmful(record.heldout) != "port":
            record.decision = "skipped"
            record.reason = (
                f"no-harm: leaving the module out fits held-out text better than the port "
                f"(relative error {record.heldout['port']:.3f})"
            )
            return None
        dW = factors.B @ factors.A
        with torch.no_grad():
            module.weight += (dW.mT if self.pairing.arch_t.transposed else dW).to(module.weight)
        record.target_norm = frobenius_norm(factors.B, factors.A)
        record.rank = factors.B.shape[1]
        key = self.pairing.tgt.resolve_module(name)
        if key is None:
            raise TransferError(f"{self.pairing.tgt.name}: no weight for {name}")
        tgt, transposed = self.pairing.tgt, self.pairing.arch_t.transposed
        side = Side(name, key, None, (m, n), t, tgt, transposed)
        source_side = Side(record.source_module, key, None, (m, n), s, tgt, transposed)
        # The output adapter scales by alpha / r like the source: the factors absorb the scale.
        lora = LoraModule(name, factors.A.float(), factors.B.float(), self.alpha, self.use_rslora)
        return Unit(source_side, side, role, lora, 1, 0), record, (factors.B / lora.scale).float(), factors.A.float()

    def _summarise(
        self, layers: list[dict[str, Any]], share: float, name: str, chunks: list[PairedChunk], started: float
    ) -> None:
        positions = sum(c.positions for c in chunks)
        samples = sum(int(c.target.ids.shape[0]) for c in chunks)
        tokens = sum(c.target.tokens for c in chunks)
        r2 = [layer["map_r2"] for layer in layers]
        mean_r2 = sum(r2) / len(r2) if r2 else 0.0
        stats: dict[str, Any] = {
            "mode": "mapped",
            "source": name,
            "samples": samples,
            "tokens": tokens,
            "aligned_positions": positions,
            "aligned_share": share,
            "depth": self.options.depth,
            "map": self.options.map,
            "layers": layers,
            "mean_map_r2": mean_r2,
            "effect_check": self.effect,
            "seconds": time.perf_counter() - started,
            "peak_rss_mb": peak_rss_mb(),
        }
        self.report.calibration = stats
        kept = sum(1 for r in self.report.records if r.decision == "transferred")
        self.report.notes.append(
            f"calibrated (mapped) on {positions} aligned position(s) ({share:.0%} of the target's tokens) from {name}: "
            f"layers paired by {self.options.depth}, {self.options.map} maps with mean held-out R^2 {mean_r2:.2f}; "
            f"{kept} residual writer(s) ported"
        )
        if mean_r2 < UNRELATED_R2:
            warning = (
                f"WARNING: the models look unrelated (mean held-out R^2 of the maps between their hidden states "
                f"{mean_r2:.2f} < {UNRELATED_R2}): expect little of the adapter's effect to carry over"
            )
            self.report.notes.append(warning)
            log.warning(warning)


def _factors(factors: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return factors.B, factors.A


__all__ = ["MappedCalibrator", "PairedChunk", "make_paired_chunks"]
