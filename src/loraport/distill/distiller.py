"""The distilled port's driver: teacher, student, training and the no-harm choice (see :mod:`loraport.distill`)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..adapters import LoraAdapter, LoraModule
from ..alignment import shared_vocabulary
from ..calibrate.options import CalibrationOptions
from ..calibrate.text import read_calibration_lines, same_vocabulary
from ..errors import TransferError
from ..io import default_cache_dir
from ..pairing import Pairing, Unit
from ..report import ModuleRecord, TransferReport, peak_rss_mb
from .generic import stdlib_paragraphs
from .options import DEFAULT_MAX_STEPS, DistillOptions, distill_summary
from .prompts import read_prompts, split_heldout
from .student import (
    base_model,
    build_student,
    evaluate_samples,
    head_rows,
    keep_samples,
    lora_parameters,
    mean_nll,
    student_modules,
    student_samples,
)
from .teacher import (
    TeacherOutputs,
    adapter_digest,
    cache_key,
    checkpoint_digest,
    generate,
    load_teacher,
    require_tokenizer,
    score_texts,
    synthesize_prompts,
)
from .train import TrainConfig, train_student

log = logging.getLogger(__name__)

Part = tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]
MIN_SHARED_SHARE = 0.05  # of the smaller vocabulary: fewer shared tokens cannot compare two distributions
GENERIC_TOKENS = 48
PROBE_LIMIT = 64


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\x1e".join(items).encode()).hexdigest()[:20]


def _vocab_rows(config: dict[str, Any]) -> int | None:
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(value) if value else None


class Distiller:
    """Runs a distilled port (see the module docstring)."""

    def __init__(
        self,
        pairing: Pairing,
        adapter: LoraAdapter,
        options: DistillOptions,
        calibration: CalibrationOptions,
        report: TransferReport,
        progress: bool = True,
        device: str = "cpu",
    ) -> None:
        self.pairing, self.adapter, self.options = pairing, adapter, options
        self.generic_text = calibration.text
        self.init_name = calibration.init
        self.report, self.progress = report, progress
        self.device = torch.device(device)
        precision = options.precision
        if precision == "auto":
            precision = "bfloat16" if self.device.type == "cuda" else "float32"
        self.autocast = torch.bfloat16 if precision == "bfloat16" else None
        self.cache = Path(options.cache) if options.cache else default_cache_dir().parent / "distill"
        first = next(iter(adapter.modules.values()))
        self.alpha, self.use_rslora = first.alpha, first.use_rslora
        self.rank = options.rank or max(m.rank for m in adapter.modules.values())
        self.info: dict[str, Any] = {"options": distill_summary(options)}
        self.teacher_key = ""  # the digest of the teacher's inputs and settings, set with the teacher

    # -- teacher --------------------------------------------------------------------------------
    def _support(self, tokenizer_s: Any, tokenizer_t: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if same_vocabulary(tokenizer_s, tokenizer_t):
            self.info["support"] = "the whole vocabulary (same tokenizer)"
            return None, None
        ids_s, ids_t = shared_vocabulary(
            tokenizer_s, tokenizer_t, _vocab_rows(self.pairing.src.config), _vocab_rows(self.pairing.tgt.config)
        )
        smaller = min(len(tokenizer_s.get_vocab()), len(tokenizer_t.get_vocab()))
        if len(ids_s) < MIN_SHARED_SHARE * smaller:
            raise TransferError(
                f"distill: the two tokenizers spell only {len(ids_s)} tokens the same way (need "
                f"{MIN_SHARED_SHARE:.0%} of the smaller vocabulary, {smaller}); their next-token distributions cannot "
                "be compared"
            )
        self.info["support"] = f"{len(ids_s)} tokens both vocabularies spell the same way"
        return ids_s, ids_t

    def _positions(self, support_s: torch.Tensor | None) -> str:
        """Where the KL is taken; ``auto``: every position with one tokenizer, the answer's across tokenizers.

        Measured (benchmarks/results/distill_zoo.md, real.md): with one tokenizer (the zoo) the KL at
        all positions beat the answer's in 11 of 12 target x task x seed cells (mean gain recovery
        0.74 vs 0.55); from SmolLM2 to Gemma-3 (bins) it scored 0.838 vs 0.875 (within noise) and
        cost the target's generic perplexity +46 % vs +25 %.
        """
        positions = self.options.positions
        if positions == "auto":
            positions = "all" if support_s is None else "answer"
        self.info["positions"] = positions
        return positions

    def _teacher(self, tokenizer_s: Any, support_s: torch.Tensor | None) -> TeacherOutputs:
        options = self.options
        positions = self._positions(support_s)
        given = read_prompts(options.prompts)  # type: ignore[arg-type]
        self.info["prompts"] = {"source": given.name, "kind": given.kind, "given": len(given.prompts),
                                "duplicates_dropped": given.duplicates}  # fmt: skip
        key = {
            "source": checkpoint_digest(self.pairing.src),
            "adapter": adapter_digest(self.adapter.modules),
            "prompts": _digest(given.prompts),
            "synthesize": options.synthesize,
            "synth_filter": options.synth_filter if options.synthesize else None,
            "synth_writer": options.synth_writer if options.synthesize else None,
            "seed": options.seed,
            "max_new_tokens": options.max_new_tokens,
            "top_k": options.top_k,
            "positions": positions,
            "support": None if support_s is None else _digest([str(i) for i in support_s.tolist()]),
        }
        self.teacher_key = cache_key(key)
        directory = self.cache / f"teacher-{self.teacher_key}"
        cached = TeacherOutputs.load(directory, key)
        if cached is not None:
            self.info["teacher"] = {"cached": str(directory), "texts": len(cached.prompts)}
            return cached
        started = time.perf_counter()
        teacher = load_teacher(self.pairing.src, self.adapter, self.device, torch.float32)
        prompts = list(given.prompts)
        synth: dict[str, Any] = {}
        candidates: list[str] = []
        if options.synthesize:
            wanted = options.synthesize * (2 if options.synth_filter == "effect" else 1)
            writer = teacher.disable_adapter() if options.synth_writer == "base" else contextlib.nullcontext()
            with writer:
                candidates, rejected = synthesize_prompts(
                    teacher, tokenizer_s, given.prompts, wanted, self.device, options.seed
                )
            synth = {"asked": options.synthesize, "writer": options.synth_writer, "written": len(candidates),
                     "rejected": rejected}  # fmt: skip
        texts = prompts + candidates
        continuations = generate(teacher, tokenizer_s, texts, options.max_new_tokens, self.device)
        measure = options.synthesize > 0 and options.synth_filter == "effect"
        scored = score_texts(
            teacher, tokenizer_s, texts, continuations, support_s, positions, options.top_k, self.device,
            measure_effect=measure,
        )  # fmt: skip
        keep = list(range(len(texts)))
        if measure:
            effect = scored[4]
            ranked = sorted(range(len(prompts), len(texts)), key=lambda i: -effect[i])
            chosen = sorted(ranked[: options.synthesize])
            keep = list(range(len(prompts))) + chosen
            synth["kept_by_effect"] = len(chosen)
        if synth:
            synth["kept"] = len(keep) - len(prompts)
            self.info["synthesized"] = synth
        outputs = TeacherOutputs(
            [texts[i] for i in keep],
            [continuations[i] for i in keep],
            [scored[0][i] for i in keep],
            [scored[1][i] for i in keep],
            [scored[2][i] for i in keep],
            [scored[3][i] for i in keep],
            "full" if support_s is None else "shared",
            [scored[4][i] for i in keep] if measure else [],
        )
        del teacher
        gc.collect()
        outputs.save(directory, key)
        self.info["teacher"] = {
            "texts": len(outputs.prompts),
            "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(peak_rss_mb()),
            "empty_continuations": sum(1 for c in outputs.continuations if not c.strip()),
        }
        return outputs

    # -- student --------------------------------------------------------------------------------
    def _generic_rows(self, tokenizer_t: Any) -> tuple[list[list[int]], list[list[int]], str]:
        """Token rows of generic text: ``(keep rows, perplexity rows, name)``, from disjoint lines.

        ``--calibration`` text, else paragraphs of the standard library's docstrings: the first
        ``generic_lines`` measure the perplexity change, the next ``4 * generic_lines`` are kept.
        """
        count = self.options.generic_lines
        if self.generic_text is not None:
            lines, name = read_calibration_lines(self.generic_text)
            lines = lines[len(lines) // 2 :][:count] + lines[: len(lines) // 2][: 4 * count]
            measured = min(count, len(lines) - len(lines) // 2) if len(lines) > 1 else len(lines)
        else:
            lines, name = stdlib_paragraphs(5 * count, self.options.seed), "standard-library docstrings"
            measured = min(count, len(lines))
        rows = [list(r) for r in tokenizer_t(lines, truncation=True, max_length=GENERIC_TOKENS)["input_ids"]]
        keep, ppl = [r for r in rows[measured:] if len(r) > 1], [r for r in rows[:measured] if len(r) > 1]
        return keep, ppl, name

    def _modules(self) -> list[str]:
        names = []
        for unit in self.pairing.units:
            if unit.target.module not in names:
                names.append(unit.target.module)
        return names

    def run(self, init_parts: list[Part], init_modules: dict[str, LoraModule]) -> list[Part]:
        """Distill from the closed-form port (``init_parts``, assembled as ``init_modules``); the parts to write.

        Returns ``init_parts`` when the start port agrees better with the teacher on the held-out
        prompts (no harm), else one part per distilled target module.
        """
        started = time.perf_counter()
        options = self.options
        tokenizer_s = require_tokenizer(self.pairing.src, "source")
        tokenizer_t = require_tokenizer(self.pairing.tgt, "target")
        support_s, support_t = self._support(tokenizer_s, tokenizer_t)
        teacher = self._teacher(tokenizer_s, support_s)
        train_idx, held_idx = split_heldout(list(range(len(teacher.prompts))), options.heldout, options.seed)
        probe_idx = train_idx[: min(len(held_idx), PROBE_LIMIT)] if len(held_idx) else train_idx[:PROBE_LIMIT]

        load_started = time.perf_counter()
        model = self.pairing.tgt.load_causal_lm(torch.float32).to(self.device)
        modules = self._modules()
        student, notes = build_student(
            model, modules, self.rank, self.alpha, self.use_rslora, init_modules, options.seed,
            fan_in_fan_out=self.pairing.arch_t.transposed,
        )  # fmt: skip
        params = lora_parameters(student)
        support_rows = None if support_t is None else head_rows(base_model(student), support_t)
        pad = tokenizer_t.pad_token_id if tokenizer_t.pad_token_id is not None else (tokenizer_t.eos_token_id or 0)
        train = student_samples(tokenizer_t, teacher, train_idx)
        heldout = student_samples(tokenizer_t, teacher, held_idx)
        probe = student_samples(tokenizer_t, teacher, probe_idx)
        aligned = sum(int(s.kl_positions.numel()) for s in train)
        wanted = sum(int(teacher.positions[i].numel()) for i in train_idx)
        if wanted and aligned == 0:
            raise TransferError("distill: no teacher position lines up with a student position (character ends)")
        keep_rows, ppl_rows, generic_name = self._generic_rows(tokenizer_t)
        keep = (
            keep_samples(student, keep_rows, pad, options.top_k, self.device, support_rows)
            if options.keep_weight > 0
            else []
        )
        with student.disable_adapter():
            base_nll = mean_nll(student, ppl_rows, self.device)
        start_nll = mean_nll(student, ppl_rows, self.device)

        weights = {"seq+kl": (1.0, 1.0), "kl": (0.0, 1.0), "seq": (1.0, 0.0)}[options.loss]
        max_steps = options.steps or DEFAULT_MAX_STEPS
        config = TrainConfig(
            max_steps, options.time, options.lr, options.warmup, options.batch_size, options.eval_every,
            options.patience, weights, options.keep_weight if keep else 0.0, options.seed, self.autocast,
        )  # fmt: skip
        run_key = {
            "teacher": self.teacher_key,  # every setting of the teacher's outputs (positions, top-K, ...)
            "prompts": _digest(teacher.prompts),
            "continuations": _digest(teacher.continuations),
            "target": checkpoint_digest(self.pairing.tgt),
            "modules": _digest(modules),
            "init": adapter_digest(init_modules) if init_modules else "zero",
            "rank": self.rank,
            "config": [max_steps, options.lr, options.warmup, options.batch_size, options.eval_every,
                       options.patience, options.loss, options.keep_weight if keep else 0.0, options.seed,
                       options.heldout, str(self.autocast)],
            "generic": _digest([str(r) for r in keep_rows]),
        }  # fmt: skip
        run_dir = self.cache / f"run-{cache_key(run_key)}"
        state = train_student(
            student, params, train, heldout, probe, keep, pad, support_rows, self.device, config, run_dir, self.progress
        )
        trained = time.perf_counter() - load_started
        final = evaluate_samples(student, heldout, pad, support_rows, self.device, options.batch_size, self.autocast)
        start = state.history[0]
        tolerance = _stderr(start.heldout_agreement, final.seq_tokens)
        distilled_wins = distilled_is_better(
            (start.heldout_agreement, start.heldout_kl), (final.agreement, final.mean_kl), tolerance
        )
        chosen_nll = mean_nll(student, ppl_rows, self.device) if distilled_wins else start_nll
        modules_out = student_modules(student, self.alpha, self.use_rslora) if distilled_wins else {}
        del student, model
        gc.collect()

        self.info.update(
            {
                "student": {
                    "rank": self.rank,
                    "modules": len(modules),
                    "init": self.init_name,
                    "train_texts": len(train_idx),
                    "heldout_texts": len(held_idx),
                    "aligned_positions": aligned,
                    "target_positions": wanted,
                    "loss": options.loss,
                    "steps": state.step,
                    "best_step": state.best_step,
                    "stopped": state.stopped,
                    "train_seconds": round(state.seconds, 1),
                    "seconds": round(trained, 1),
                    "history": [e.__dict__ for e in state.history],
                    "notes": notes,
                },
                "heldout": {
                    "start": {"agreement": start.heldout_agreement, "kl": start.heldout_kl},
                    "distilled": {"agreement": final.agreement, "kl": final.mean_kl, "tokens": final.seq_tokens},
                    "tolerance": tolerance,
                },
                "chosen": "distilled" if distilled_wins else "start",
                "generic": {
                    "text": generic_name,
                    "lines": len(ppl_rows),
                    "base_nll": base_nll,
                    "start_nll": start_nll,
                    "written_nll": chosen_nll,
                    "perplexity_change": float(torch.tensor(chosen_nll - base_nll).exp() - 1),
                },
                "seconds": round(time.perf_counter() - started, 1),
                "peak_rss_mb": round(peak_rss_mb()),
            }
        )
        self.report.distill = self.info
        self._notes(state.stopped)
        if not distilled_wins:
            return init_parts
        # The records so far describe the start port (the unit loop's): summarised, then replaced.
        start_records = [r for r in self.report.records if r.decision != "skipped"]
        self.info["start_port"] = {
            "method": self.init_name,
            "modules": len(start_records),
            "mean_kept_energy": _mean([r.kept_energy for r in start_records]),
        }
        self.report.records = []
        return self._parts(modules_out, notes)

    def _parts(self, modules: dict[str, LoraModule], notes: dict[str, str]) -> list[Part]:
        """One part per distilled module (its factors at the module's own scale) with its record."""
        by_target: dict[str, Unit] = {}
        for unit in self.pairing.units:
            by_target.setdefault(unit.target.module, unit)
        parts: list[Part] = []
        for name, module in modules.items():
            unit = by_target[name]
            target = replace(unit.target, rows=None, shape=(unit.target.out_rows, unit.target.shape[1]),
                             module_rows=None)  # fmt: skip
            record = ModuleRecord(f"(distilled from the adapter; {unit.source.module})", name, unit.role,
                                  unit.source.layer, unit.target.layer, target.shape, target.shape)  # fmt: skip
            norm = float(torch.linalg.matrix_norm(module.B.double() @ module.A.double())) * module.scale
            record.target_norm, record.rank = norm, module.rank
            record.note = "distilled" + (f"; {notes[name]}" if name in notes else "")
            if norm == 0.0:
                record.decision, record.reason = "skipped", "distilled update is zero"
                self.report.records.append(record)
                continue
            self.report.records.append(record)
            parts.append((replace(unit, target=target, source_module=module), record, module.B, module.A))
        return parts

    def _notes(self, stopped: str) -> None:
        info, notes = self.info, self.report.notes
        held, generic, student = info["heldout"], info["generic"], info["student"]
        notes.append(
            f"distill: {student['train_texts']} prompt(s) trained on, {student['heldout_texts']} held out; "
            f"{student['steps']} step(s) ({stopped}); support: {info['support']}; KL at {info.get('positions')} "
            "positions"
        )
        notes.append(
            f"distill: held-out agreement with the teacher {held['start']['agreement']:.3f} (start port) -> "
            f"{held['distilled']['agreement']:.3f} (distilled), KL {held['start']['kl']:.3f} -> "
            f"{held['distilled']['kl']:.3f}; written: {info['chosen']}"
        )
        notes.append(
            f"distill: the target's perplexity on generic text ({generic['text']}) changes by "
            f"{generic['perplexity_change']:+.1%} with the written adapter"
        )
        if info["chosen"] == "start":
            warning = (
                "WARNING: distilling made held-out agreement with the teacher worse than the start port (or no "
                "better, with a higher KL): the start port was written"
            )
            notes.append(warning)
            log.warning(warning)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def distilled_is_better(start: tuple[float, float], distilled: tuple[float, float], tolerance: float) -> bool:
    """Whether to write the distilled adapter rather than the start port, from their held-out (agreement, KL).

    The distilled one wins when its agreement is higher by more than ``tolerance`` (one standard
    error); within it, when its KL is not higher (a tie in agreement is settled by the KL: on a
    derivative, distilling from a copy that already agrees can leave agreement as it was and the KL
    2.5 times higher, benchmarks/results/real.md); below it, never.
    """
    (start_agreement, start_kl), (agreement, kl) = start, distilled
    if agreement > start_agreement + tolerance:
        return True
    return agreement >= start_agreement - tolerance and kl <= start_kl


def _stderr(agreement: float, n: int) -> float:
    return (max(agreement * (1 - agreement), 1e-12) / n) ** 0.5 if n else 0.0


__all__ = ["Distiller", "distilled_is_better"]
