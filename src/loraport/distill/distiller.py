"""The distilled port's driver: teacher, student, training and the no-harm choice (see :mod:`loraport.distill`)."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..adapters import LoraAdapter, LoraModule
from ..calibrate.options import CalibrationOptions
from ..errors import TransferError
from ..io import default_cache_dir
from ..pairing import Pairing, Unit
from ..report import ModuleRecord, TransferReport, peak_rss_mb
from .bound import SIDE_EFFECT_MARGIN, adapter_change, bound_info, bound_note, keep_key, start_bound, watch_plan
from .generic import generic_lines, perplexity_change_stderr, pooled_nll, row_nlls, token_rows
from .options import DistillOptions, distill_summary
from .prompts import read_prompts, split_heldout
from .student import (
    base_model,
    build_student,
    evaluate_samples,
    head_rows,
    keep_samples,
    lora_parameters,
    student_layers,
    student_modules,
    student_samples,
    upper_half_only,
)
from .teacher import TeacherOutputs, adapter_digest, cache_key, checkpoint_digest, require_tokenizer
from .teaching import GENERIC_TOKENS, digest, kl_positions, run_teacher, support_ids, teacher_key
from .timing import Phases, release_memory
from .train import TaskSamples, autocast_dtype, train_config, train_student, weights_dtype
from .views import TeacherView, student_view, teacher_view

log = logging.getLogger(__name__)

Part = tuple[Unit, ModuleRecord, torch.Tensor, torch.Tensor]
PROBE_LIMIT = 64
ENDED_AT_ONCE_SHARE = 0.5  # more of the prompts than this answered with nothing: the port would learn nothing


class Distiller:
    """Runs a distilled port (see :mod:`loraport.distill`)."""

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
        self.autocast = autocast_dtype(options.precision, self.device)
        self.weights = weights_dtype(options.precision, self.device)
        self.cache = Path(options.cache) if options.cache else default_cache_dir().parent / "distill"
        first = next(iter(adapter.modules.values()))
        self.alpha, self.use_rslora = first.alpha, first.use_rslora
        self.rank = options.rank or max(m.rank for m in adapter.modules.values())
        self.info: dict[str, Any] = {"options": distill_summary(options)}
        self.phases = Phases()
        self.teacher_key = ""  # the digest of the teacher's inputs and settings, set with the teacher
        self.refusal: str | None = None  # why nothing is written, when the port learned nothing

    # -- teacher --------------------------------------------------------------------------------
    def _teacher(
        self, tokenizer_s: Any, support_s: torch.Tensor | None, ppl_lines: list[str]
    ) -> tuple[TeacherOutputs, TeacherView]:
        options = self.options
        positions = kl_positions(options.positions, support_s)
        self.info["positions"] = positions
        given = read_prompts(options.prompts)  # type: ignore[arg-type]
        self.info["prompts"] = {"source": given.name, "kind": given.kind, "given": len(given.prompts),
                                "duplicates_dropped": given.duplicates}  # fmt: skip
        view = teacher_view(given, options, tokenizer_s)
        key = teacher_key(self.pairing.src, self.adapter, given, options, view, positions, support_s, ppl_lines)
        self.teacher_key = cache_key(key)
        outputs, info = run_teacher(
            self.pairing.src, self.adapter, given, options, view, tokenizer_s, positions, support_s, ppl_lines,
            self.cache / f"teacher-{self.teacher_key}", key, self.device, self.progress, self.phases,
        )  # fmt: skip
        self.info["teacher"] = info
        if outputs.info.get("synthesized"):
            self.info["synthesized"] = outputs.info["synthesized"]
        return outputs, view

    def _refuse(self, reason: str) -> list[Part]:
        """Nothing to write: one skipped record with the reason, which the port core raises (one line)."""
        self.refusal = reason
        self.report.distill = self.info
        self.report.notes.append(f"WARNING: {reason}")
        log.warning("WARNING: %s", reason)
        unit = self.pairing.units[0]
        record = ModuleRecord("(distillation)", "(none)", unit.role, unit.source.layer, unit.target.layer,
                              unit.source.shape, unit.target.shape, decision="skipped", reason=reason)  # fmt: skip
        self.report.records = [record]
        return []

    def _ended_at_once(self, teacher: TeacherOutputs, view: TeacherView) -> str | None:
        """Why distilling would learn nothing because the teacher answered nothing, or ``None``."""
        greedy = [i for i in range(len(teacher.prompts)) if teacher.greedy[i]]
        empty = sum(1 for i in greedy if not teacher.continuations[i].strip() and teacher.ended[i] != "length")
        if empty <= ENDED_AT_ONCE_SHARE * len(greedy):
            return None
        hint = (
            "is the prompts' conversation what the adapter was trained on? check --source-chat-template"
            if view.chat
            else "does the adapter expect its chat template? try --chat"
        )
        return f"distill: the teacher ended its turn at once on {empty} of {len(greedy)} prompts: {hint}"

    # -- student --------------------------------------------------------------------------------
    def _modules(self, started: bool) -> list[str]:
        """The target modules the student adapts: those the pairing maps the adapter to (the upper half only
        by :func:`student_layers`; ``started``: the student starts from a port)."""
        return student_layers([self.pairing], self.options.layers, started)

    def _split(self, teacher: TeacherOutputs) -> tuple[list[int], list[int], list[int]]:
        """``(train, held-out, probe)`` text indices: prompts are held out whole (their samples too); the
        held-out and probe sets hold greedy continuations only."""
        prompt_ids = sorted(set(teacher.sources))
        _, held_prompts = split_heldout(prompt_ids, self.options.heldout, self.options.seed)
        held_set = set(held_prompts)
        train = [i for i in range(len(teacher.prompts)) if teacher.sources[i] not in held_set]
        held = [i for i in range(len(teacher.prompts)) if teacher.sources[i] in held_set and teacher.greedy[i]]
        greedy_train = [i for i in train if teacher.greedy[i]]
        probe = greedy_train[: min(len(held), PROBE_LIMIT)] if held else greedy_train[:PROBE_LIMIT]
        return train, held, probe

    def run(self, init_parts: list[Part], init_modules: dict[str, LoraModule]) -> list[Part]:
        """Distill from the closed-form port (``init_parts``, assembled as ``init_modules``); the parts to write.

        Returns ``init_parts`` when the start port agrees better with the teacher on the held-out
        prompts (no harm), else one part per distilled target module; nothing (a skipped record
        with the reason) when the port learned nothing and there is no start port to fall back on.
        """
        started = time.perf_counter()
        options = self.options
        phase = self.phases
        with phase("tokenizers"):
            tokenizer_s = require_tokenizer(self.pairing.src, "source")
            tokenizer_t = require_tokenizer(self.pairing.tgt, "target")
            support_s, support_t, self.info["support"] = support_ids(self.pairing, tokenizer_s, tokenizer_t)
        keep_lines, ppl_lines, generic_name = generic_lines(self.generic_text, options.generic_lines, options.seed)
        teacher, view = self._teacher(tokenizer_s, support_s, ppl_lines)
        refusal = self._ended_at_once(teacher, view)
        if refusal is not None and not options.force:
            if init_parts:
                self.report.notes.append(f"WARNING: {refusal}; the start port is written")
                self.info["chosen"] = "start"
                self.report.distill = self.info
                return init_parts
            return self._refuse(refusal + " (nothing written; --distill-force writes the port anyway)")
        train_idx, held_idx, probe_idx = self._split(teacher)
        student_reads, target_template = student_view(
            teacher.items, view.chat, options, tokenizer_t, view.end_ids, support_s is None
        )  # fmt: skip
        self.info["chat"] = {"source": view.describe(), "target": target_template} if view.chat else None

        with phase("student: load"):
            model = self.pairing.tgt.load_causal_lm(self.weights).to(self.device)
            modules = self._modules(bool(init_modules))
            upper = upper_half_only(options.layers, bool(init_modules), self.pairing.layers_t)
            self.info["layers"] = "upper half" if upper else "all"
            student, notes = build_student(
                model, modules, self.rank, self.alpha, self.use_rslora, init_modules, options.seed,
                fan_in_fan_out=self.pairing.arch_t.transposed,
            )  # fmt: skip
            params = lora_parameters(student)
            support_rows = None if support_t is None else head_rows(base_model(student), support_t)
            keep_support = support_rows if options.keep_vocab == "support" else None
        pad = tokenizer_t.pad_token_id if tokenizer_t.pad_token_id is not None else (tokenizer_t.eos_token_id or 0)
        with phase("student: targets"):
            train = student_samples(tokenizer_t, teacher, train_idx, student_reads)
            heldout = student_samples(tokenizer_t, teacher, held_idx, student_reads)
            probe = student_samples(tokenizer_t, teacher, probe_idx, student_reads)
        aligned = sum(int(s.kl_positions.numel()) for s in train)
        wanted = sum(int(teacher.positions[i].numel()) for i in train_idx)
        if wanted and aligned == 0 and not any(s.seq_ids.numel() for s in train):
            raise TransferError("distill: no teacher position lines up with a student position (character ends)")
        own_change = adapter_change(teacher.info.get("generic", {}))
        keep_lines, watched, limit = watch_plan(options, self.generic_text, [own_change], keep_lines)
        keep_rows = token_rows(tokenizer_t, keep_lines, GENERIC_TOKENS)
        ppl_rows = token_rows(tokenizer_t, ppl_lines, GENERIC_TOKENS)
        watch_rows = token_rows(tokenizer_t, watched, GENERIC_TOKENS)
        del tokenizer_s, tokenizer_t  # Gemma-3's holds 0.45 GB; everything after works on token ids
        with phase("student: keep targets and perplexity before"):
            keep = (
                keep_samples(student, keep_rows, pad, options.top_k, self.device, keep_support)
                if options.keep_weight > 0
                else []
            )
            with student.disable_adapter():
                base_lines = row_nlls(student, ppl_rows, self.device)
                base_nll = pooled_nll(base_lines)
            bound = start_bound(student, watch_rows if keep else [], limit, self.device)
            start_lines = row_nlls(student, ppl_rows, self.device) if init_modules else base_lines
            start_nll = pooled_nll(start_lines)

        config = train_config(options, self.autocast, bool(keep))
        max_steps = config.max_steps
        run_key = {
            "teacher": self.teacher_key,  # every setting of the teacher's outputs (positions, top-K, ...)
            "target": checkpoint_digest(self.pairing.tgt),
            "student_view": [digest(student_reads.prompts), student_reads.end_id, student_reads.keep_end_kl,
                             student_reads.select_share],
            "modules": digest(modules),
            "init": adapter_digest(init_modules) if init_modules else "zero",
            "rank": self.rank,
            "config": [max_steps, options.lr, options.warmup, options.batch_size, options.eval_every,
                       options.patience, options.loss, options.keep_weight if keep else 0.0, options.seed,
                       options.heldout, str(self.autocast), str(self.weights)],
            "generic": digest([str(r) for r in keep_rows]),
            **keep_key(options, bound),
        }  # fmt: skip
        run_dir = self.cache / f"run-{cache_key(run_key)}"
        release_memory()  # what loading and the checks before training freed
        with phase("student: train"):
            task = TaskSamples("adapter", train, heldout, probe, support_rows)
            state = train_student(
                student, params, [task], keep, pad, self.device, config, run_dir, self.progress,
                keep_support=keep_support, bound=bound,
            )  # fmt: skip
        with phase("student: held-out check"):
            final = evaluate_samples(
                student, heldout, pad, support_rows, self.device, options.batch_size, self.autocast
            )  # fmt: skip
        start = state.history[0]
        tolerance = _stderr(start.heldout_agreement, final.seq_tokens)
        distilled_wins = distilled_is_better(
            (start.heldout_agreement, start.heldout_kl), (final.agreement, final.mean_kl), tolerance
        )
        learned = final.agreement > start.heldout_agreement + tolerance
        if not init_parts and options.force:
            distilled_wins = True  # nothing to fall back on, and asked to write what was learned
        with phase("student: perplexity after"):
            chosen_lines = row_nlls(student, ppl_rows, self.device) if distilled_wins else start_lines
            chosen_nll = pooled_nll(chosen_lines)
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
                    "tokens": options.tokens,
                    "steps": state.step,
                    "best_step": state.best_step,
                    "stopped": state.stopped,
                    "train_seconds": round(state.seconds, 1),
                    "steps_per_second": round(state.step / state.seconds, 3) if state.seconds else None,
                    "parts": state.parts,  # texts, generic lines per backward pass
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
                    "perplexity_change": _change(base_nll, chosen_nll),
                    "perplexity_change_stderr": perplexity_change_stderr(base_lines, chosen_lines),
                    "source_perplexity_change": own_change,
                    "source_perplexity_change_stderr": teacher.info.get("generic", {}).get("change_stderr"),
                    "bound": bound_info(bound, state),
                },
            }
        )
        self._finish(started)
        self._notes(state.stopped)
        if not init_parts and not (learned and distilled_wins) and not options.force:
            held = self.info["heldout"]
            return self._refuse(
                f"distill: held-out agreement with the teacher did not rise above the start's "
                f"({held['start']['agreement']:.3f} -> {held['distilled']['agreement']:.3f}, one s.e. "
                f"{tolerance:.3f}): "
                "the port learned nothing; nothing written (--distill-force writes it anyway)"
            )
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

    def _finish(self, started: float) -> None:
        self.info["timings"] = self.phases.rounded()
        self.info["peak_rss_by_phase_mb"] = dict(self.phases.peak_mb)
        self.info["seconds"] = round(time.perf_counter() - started + self.phases.seconds.get("start port", 0.0), 1)
        self.info["peak_rss_mb"] = round(peak_rss_mb())
        self.report.distill = self.info

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
        held, generic, student, teacher = info["heldout"], info["generic"], info["student"], info["teacher"]
        ended = teacher.get("ended", {})
        chat = info.get("chat")
        notes.append(
            f"distill: {student['train_texts']} text(s) trained on, {student['heldout_texts']} held out; "
            f"{student['steps']} step(s) ({stopped}); support: {info['support']}; KL at {info.get('positions')} "
            "positions" + ("; the student's LoRA on the upper half of the target's layers" if (
                info.get("layers") == "upper half") else "")
        )  # fmt: skip
        notes.append(
            f"distill: teacher continuations ended by the end token {ended.get('end', 0)}, a stop string "
            f"{ended.get('stop', 0)}, the {teacher.get('max_new_tokens')}-token cap {ended.get('length', 0)}; "
            f"{teacher.get('mean_tokens', 0):g} tokens on average"
            + (f"; chat templates: source {chat['source']}, target {chat['target']}" if chat else "")
        )
        if not teacher.get("multiple_choice") and ended.get("length", 0) > 0.25 * max(1, sum(ended.values())):
            notes.append(f"WARNING: {ended['length']} teacher continuation(s) were cut at "
                         f"{teacher.get('max_new_tokens')} tokens: raise --distill-max-new-tokens")  # fmt: skip
        notes.append(
            f"distill: held-out agreement with the teacher {held['start']['agreement']:.3f} (start port) -> "
            f"{held['distilled']['agreement']:.3f} (distilled), KL {held['start']['kl']:.3f} -> "
            f"{held['distilled']['kl']:.3f}; written: {info['chosen']}"
        )
        own, port = generic.get("source_perplexity_change"), generic["perplexity_change"]
        notes.append(
            f"distill: perplexity on generic text ({generic['text']}, {generic['lines']} lines): the adapter "
            "changes its source's by "
            + (f"{own:+.1%}{_stderr_text(generic.get('source_perplexity_change_stderr'))}" if own is not None
               else "an unknown amount")
            + f", the written port changes the target's by {port:+.1%}"
            + _stderr_text(generic.get("perplexity_change_stderr"))
        )  # fmt: skip
        if generic.get("bound"):
            notes.append(bound_note(generic["bound"]))
        if own is not None and port > max(own, 0.0) + SIDE_EFFECT_MARGIN:
            warning = (
                f"WARNING: the port raises the target's generic perplexity by {port:+.1%} where the adapter changes "
                f"its source's by {own:+.1%}: it changes the target elsewhere more than the adapter changes its own "
                "base (--distill-keep-weight, --distill-keep-bound, --calibration with generic text)"
            )
            notes.append(warning)
            log.warning(warning)
        timings = ", ".join(f"{name} {value:.0f} s" for name, value in info.get("timings", {}).items())
        rate = student.get("steps_per_second")
        notes.append(f"distill: time {info['seconds']:.0f} s: {timings}" + (f"; {rate:.2f} steps/s" if rate else ""))
        if info["chosen"] == "start":
            warning = (
                "WARNING: distilling made held-out agreement with the teacher worse than the start port (or no "
                "better, with a higher KL): the start port was written"
            )
            notes.append(warning)
            log.warning(warning)


def _stderr_text(stderr: float | None) -> str:
    """`` (s.e. 2.1 points)`` over the lines, or nothing when it is unknown (a teacher cached before it was kept)."""
    return "" if stderr is None else f" (s.e. {stderr * 100:.1f} points)"


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


def _change(before: float | None, after: float | None) -> float | None:
    """The perplexity change of a mean NLL going from ``before`` to ``after`` (``exp(after - before) - 1``)."""
    if before is None or after is None:
        return None
    return float(torch.tensor(after - before).exp() - 1)


def _stderr(agreement: float, n: int) -> float:
    return (max(agreement * (1 - agreement), 1e-12) / n) ** 0.5 if n else 0.0


__all__ = ["Distiller", "distilled_is_better"]
