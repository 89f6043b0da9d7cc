"""Several teachers, one student: the distilled fusion of adapters (``loraport fuse --method distill``).

Each adapter, on its own base, is a teacher on its own prompts (:func:`~.teaching.run_teacher`:
computed once, cached, one teacher in memory at a time). One student LoRA on the chosen target
learns them all: every step splits its batch evenly over the teachers, each with its own
support (a teacher with the target's tokenizer is matched over the whole vocabulary, another
over the tokens both spell alike), plus the keep term on generic text
(:func:`~.train.train_student`). The start is the weight-space merge where the adapters share the
target's base (given by the caller), else the target itself. No harm, per task: held-out
agreement with each teacher is measured before and after; the distilled fusion is written unless
it is worse than the start on some task by more than that task's standard error, and then the
better of the two by the worst task.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters import LoraAdapter, LoraModule, lora_scale
from ..checkpoints import Checkpoint
from ..errors import TransferError
from ..io import default_cache_dir
from ..pairing import Pairing
from ..report import peak_rss_mb
from .bound import adapter_change, bound_info, keep_key, start_bound, watch_plan
from .coefficients import COEFFICIENT_LR_SCALE, coefficient_table, fold_coefficients, learn_coefficients
from .generic import generic_lines, mean_nll, token_rows
from .options import DistillOptions
from .prompts import read_prompts, split_heldout
from .student import (
    base_model,
    build_student,
    evaluate_samples,
    head_rows,
    keep_samples,
    lora_parameters,
    set_factors,
    student_layers,
    student_modules,
    student_samples,
)
from .teacher import TeacherOutputs, adapter_digest, cache_key, checkpoint_digest, require_tokenizer
from .teaching import GENERIC_TOKENS, digest, kl_positions, run_teacher, support_ids, teacher_key
from .timing import Phases, release_memory
from .train import TaskSamples, autocast_dtype, train_config, train_student, weights_dtype
from .views import student_view, teacher_view, wants_chat

PROBE_LIMIT = 64


@dataclass
class Teacher:
    """One adapter to fuse: the adapter, the base it was trained on, the task's prompts, a name.

    ``synthesize``: the teacher writes this many more prompts in the style of the given ones.
    """

    adapter: LoraAdapter
    source: Checkpoint
    prompts: str | os.PathLike[str] | Sequence[str]
    name: str
    synthesize: int = 0


@dataclass
class _Prepared:
    teacher: Teacher
    pairing: Pairing
    outputs: TeacherOutputs
    chat: bool
    end_ids: list[int]
    support_t: torch.Tensor | None
    info: dict[str, Any]


def _stderr(agreement: float, n: int) -> float:
    return (max(agreement * (1 - agreement), 1e-12) / n) ** 0.5 if n else 0.0


class MultiDistiller:
    """Distils several teachers into one LoRA on ``target`` (see the module docstring).

    Args:
        teachers: the adapters with their bases and prompts.
        target: the base the fused adapter is for.
        options: distillation settings shared by all teachers (their ``prompts`` and ``synthesize``
            are each teacher's own).
        generic_text: ``--calibration`` text the student keeps the target's predictions on and the
            perplexity change is measured on (default: standard-library docstrings).
        rank: the student's rank (default: the sum of the adapters' ranks).
    """

    def __init__(
        self,
        teachers: Sequence[Teacher],
        target: Checkpoint,
        options: DistillOptions,
        generic_text: str | None = None,
        rank: int | None = None,
        progress: bool = True,
        device: str = "cpu",
    ) -> None:
        self.teachers, self.target, self.options = list(teachers), target, options
        self.generic_text, self.progress = generic_text, progress
        self.device = torch.device(device)
        self.rank = rank or sum(max(m.rank for m in t.adapter.modules.values()) for t in teachers)
        first = next(iter(teachers[0].adapter.modules.values()))
        self.alpha = first.scale * self.rank  # the first adapter's scale, at the student's rank
        self.use_rslora = False
        self.autocast = autocast_dtype(options.precision, self.device)
        self.weights = weights_dtype(options.precision, self.device)
        self.cache = Path(options.cache) if options.cache else default_cache_dir().parent / "distill"
        self.phases = Phases()
        self.info: dict[str, Any] = {"teachers": [], "rank": self.rank}

    def _prepare(self, teacher: Teacher, tokenizer_t: Any, ppl_lines: list[str]) -> _Prepared:
        options = self.options
        pairing = Pairing(teacher.adapter, teacher.source, self.target, None)
        tokenizer_s = require_tokenizer(teacher.source, f"source ({teacher.name})")
        support_s, support_t, support = support_ids(pairing, tokenizer_s, tokenizer_t)
        positions = kl_positions(options.positions, support_s)
        given = read_prompts(teacher.prompts)
        own = DistillOptions(**{**vars(options), "prompts": teacher.prompts, "synthesize": teacher.synthesize})
        if not wants_chat(given, own):  # the chat templates are for the teachers whose prompts are conversations
            own = DistillOptions(**{**vars(own), "source_chat_template": None, "target_chat_template": None})
        elif getattr(tokenizer_s, "chat_template", None):  # and the source file for bases without their own
            own = DistillOptions(**{**vars(own), "source_chat_template": None})
        view = teacher_view(given, own, tokenizer_s)
        key = teacher_key(teacher.source, teacher.adapter, given, own, view, positions, support_s, ppl_lines)
        outputs, info = run_teacher(
            teacher.source, teacher.adapter, given, own, view, tokenizer_s, positions, support_s, ppl_lines,
            self.cache / f"teacher-{cache_key(key)}", key, self.device, self.progress, self.phases,
        )  # fmt: skip
        info.update({"name": teacher.name, "prompts": given.name, "kind": given.kind, "support": support,
                     "positions": positions, "key": cache_key(key)})  # fmt: skip
        return _Prepared(teacher, pairing, outputs, view.chat, view.end_ids, support_t, info)

    def _modules(self, prepared: Sequence[_Prepared], started: bool) -> list[str]:
        return student_layers([item.pairing for item in prepared], self.options.layers, started)

    def run(
        self,
        init_modules: dict[str, LoraModule],
        candidates: dict[str, dict[str, LoraModule]] | None = None,
        min_kept: float | None = None,
    ) -> tuple[dict[str, LoraModule] | None, dict[str, Any]]:
        """The fused modules (``None`` when nothing should be written: the info says why) and the report's record.

        ``init_modules``: the start (a weight-space merge of the adapters on the target's base), or empty.
        ``candidates``: weight-space merges by name, scored first by held-out agreement with each teacher
        (no training): the best by the worst task is returned as it is when that agreement is at least
        ``min_kept``, else it is the start of the distillation.
        """
        started = time.perf_counter()
        options, phase = self.options, self.phases
        tokenizer_t = require_tokenizer(self.target, "target")
        keep_lines, ppl_lines, generic_name = generic_lines(self.generic_text, options.generic_lines, options.seed)
        prepared = [self._prepare(t, tokenizer_t, ppl_lines) for t in self.teachers]
        with phase("student: load"):
            model = self.target.load_causal_lm(self.weights).to(self.device)
            modules = self._modules(prepared, bool(init_modules) or bool(candidates))
            student, notes = build_student(model, modules, self.rank, self.alpha, self.use_rslora, init_modules,
                                           options.seed)  # fmt: skip
            params = lora_parameters(student)
        pad = tokenizer_t.pad_token_id if tokenizer_t.pad_token_id is not None else (tokenizer_t.eos_token_id or 0)
        tasks: list[TaskSamples] = []
        keep_support: torch.Tensor | None = None
        with phase("student: targets"):
            for item in prepared:
                outputs = item.outputs
                held_prompts = set(split_heldout(sorted(set(outputs.sources)), options.heldout, options.seed)[1])
                train = [i for i in range(len(outputs.prompts)) if outputs.sources[i] not in held_prompts]
                held = [
                    i for i in range(len(outputs.prompts)) if outputs.sources[i] in held_prompts and outputs.greedy[i]
                ]
                probe = [i for i in train if outputs.greedy[i]][: min(max(len(held), 1), PROBE_LIMIT)]
                view, target_template = student_view(
                    outputs.items, item.chat, options, tokenizer_t, item.end_ids, item.support_t is None
                )  # fmt: skip
                rows = None if item.support_t is None else head_rows(base_model(student), item.support_t)
                if rows is not None and keep_support is None and options.keep_vocab == "support":
                    keep_support = rows
                samples = [student_samples(tokenizer_t, outputs, chosen, view) for chosen in (train, held, probe)]
                tasks.append(TaskSamples(item.teacher.name, *samples, rows))
                item.info.update({"train_texts": len(train), "heldout_texts": len(held),
                                  "target_chat_template": target_template if item.chat else None})  # fmt: skip
        owns = [adapter_change(item.outputs.info.get("generic", {})) for item in prepared]
        keep_lines, watched, limit = watch_plan(options, self.generic_text, owns, keep_lines)
        keep_rows = token_rows(tokenizer_t, keep_lines, GENERIC_TOKENS)
        ppl_rows = token_rows(tokenizer_t, ppl_lines, GENERIC_TOKENS)
        watch_rows = token_rows(tokenizer_t, watched, GENERIC_TOKENS)
        del tokenizer_t  # Gemma-3's holds 0.45 GB; everything after works on token ids (as in Distiller.run)
        with phase("student: keep targets and perplexity before"):
            keep = keep_samples(student, keep_rows, pad, options.top_k, self.device, keep_support) if (
                options.keep_weight > 0
            ) else []  # fmt: skip
            with student.disable_adapter():
                base_nll = mean_nll(student, ppl_rows, self.device)
            bound = start_bound(student, watch_rows if keep else [], limit, self.device)
        scale = lora_scale(self.alpha, self.rank, self.use_rslora)
        if candidates:
            with phase("candidates: score"):
                best, table = self._score_candidates(student, tasks, pad, candidates)
            self.info["candidates"] = {"table": table, "best": best, "min_kept": min_kept}
            init_modules = candidates[best]
            set_factors(student, init_modules, self.rank, scale)
            if min_kept is not None and table[best]["worst"] >= min_kept:
                seconds = round(time.perf_counter() - started, 1)
                self.info.update({"chosen": f"weight-space merge ({best})", "timings": phase.rounded(),
                                  "teachers": [item.info for item in prepared], "seconds": seconds,
                                  "peak_rss_mb": round(peak_rss_mb())})  # fmt: skip
                return init_modules, self.info
        config = train_config(options, self.autocast, bool(keep))
        if options.learn == "coefficients":  # the adapters side by side, one weight each per layer
            params = learn_coefficients(student, [t.adapter for t in self.teachers], scale)
            init_modules = student_modules(student, self.alpha, self.use_rslora)
            config = dataclasses.replace(config, lr=config.lr * COEFFICIENT_LR_SCALE)
        with phase("student: perplexity of the start"):
            start_nll = mean_nll(student, ppl_rows, self.device) if init_modules else base_nll
        max_steps = config.max_steps
        run_key = {
            "teachers": [item.info["key"] for item in prepared],
            "target": checkpoint_digest(self.target),
            "modules": digest(modules),
            "init": adapter_digest(init_modules) if init_modules else "zero",
            "rank": self.rank,
            "config": [max_steps, options.lr, options.warmup, options.batch_size, options.eval_every,
                       options.patience, options.loss, config.keep_weight, options.seed, options.heldout,
                       str(self.autocast), str(self.weights), options.tokens, options.token_share, options.learn]
            + ([options.task_shares] if options.task_shares != "even" else []),
            "generic": digest([str(r) for r in keep_rows]),
            **keep_key(options, bound),
        }  # fmt: skip
        release_memory()  # what loading and the checks before training freed
        with phase("student: train"):
            state = train_student(
                student, params, tasks, keep, pad, self.device, config, self.cache / f"fuse-{cache_key(run_key)}",
                self.progress, keep_support=keep_support, bound=bound,
            )  # fmt: skip
        with phase("student: held-out check"):
            finals = [
                evaluate_samples(student, t.heldout, pad, t.support, self.device, options.batch_size, self.autocast)
                for t in tasks
            ]
        start = state.history[0]
        per_task = []
        for index, (item, final) in enumerate(zip(prepared, finals, strict=True)):
            before = start.tasks[index] if start.tasks else {
                "heldout_agreement": start.heldout_agreement, "heldout_kl": start.heldout_kl
            }  # fmt: skip
            tolerance = _stderr(before["heldout_agreement"], final.seq_tokens)
            per_task.append({
                "task": item.teacher.name,
                "start": {"agreement": before["heldout_agreement"], "kl": before["heldout_kl"]},
                "distilled": {"agreement": final.agreement, "kl": final.mean_kl, "tokens": final.seq_tokens},
                "tolerance": tolerance,
                "worse": final.agreement < before["heldout_agreement"] - tolerance,
                "learned": final.agreement > before["heldout_agreement"] + tolerance,
            })  # fmt: skip
        worst_start = min(t["start"]["agreement"] for t in per_task)
        worst_distilled = min(t["distilled"]["agreement"] for t in per_task)
        if init_modules:
            distilled_wins = not any(t["worse"] for t in per_task) or worst_distilled > worst_start
        else:
            distilled_wins = any(t["learned"] for t in per_task) or options.force
        with phase("student: perplexity after"):
            written_nll = mean_nll(student, ppl_rows, self.device) if distilled_wins else start_nll
        if options.learn == "coefficients":
            self.info["coefficients"] = coefficient_table(params, [t.name for t in self.teachers])
            fold_coefficients(student)
        fused = student_modules(student, self.alpha, self.use_rslora) if distilled_wins else None
        del student, model
        gc.collect()
        self.info.update({
            "tasks": per_task,
            "chosen": "distilled" if distilled_wins else ("start" if init_modules else "nothing"),
            "teachers": [item.info for item in prepared],
            "student": {"modules": len(modules), "steps": state.step, "best_step": state.best_step,
                        "stopped": state.stopped, "train_seconds": round(state.seconds, 1),
                        "steps_per_second": round(state.step / state.seconds, 3) if state.seconds else None,
                        "parts": state.parts, "history": [e.__dict__ for e in state.history], "notes": notes},
            "generic": {"text": generic_name, "lines": len(ppl_rows), "base_nll": base_nll, "start_nll": start_nll,
                        "written_nll": written_nll,
                        "perplexity_change": float(torch.tensor(written_nll - base_nll).exp() - 1),
                        "source_perplexity_changes": {
                            item.teacher.name: own for item, own in zip(prepared, owns, strict=True)
                        },
                        "bound": bound_info(bound, state)},
            "timings": phase.rounded(),
            "peak_rss_by_phase_mb": dict(phase.peak_mb),
            "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(peak_rss_mb()),
        })  # fmt: skip
        if fused is None and not init_modules:
            self.info["refusal"] = (
                "distill: held-out agreement with no teacher rose above the start's: the fusion learned nothing; "
                "nothing written (--distill-force writes it anyway)"
            )
        return (fused if distilled_wins else (init_modules or None)), self.info

    def _score_candidates(
        self, student: Any, tasks: Sequence[TaskSamples], pad: int, candidates: dict[str, dict[str, LoraModule]]
    ) -> tuple[str, dict[str, dict[str, Any]]]:
        """Each candidate's held-out agreement with each teacher; the best by the worst task (ties: listed first)."""
        table: dict[str, dict[str, Any]] = {}
        scale = lora_scale(self.alpha, self.rank, self.use_rslora)
        for name, modules in candidates.items():
            set_factors(student, modules, self.rank, scale)
            agreements = {
                task.name: evaluate_samples(student, task.heldout, pad, task.support, self.device,
                                            self.options.batch_size, self.autocast).agreement
                for task in tasks
            }  # fmt: skip
            table[name] = {"agreement": agreements, "worst": min(agreements.values())}
        best = max(table, key=lambda name: table[name]["worst"])  # max keeps the first of equals
        return best, table


def check_teacher_counts(models: int, bases: int, prompts: int, synthesize: int | Sequence[int] = 0) -> list[int]:
    """One-line errors for mismatched counts of adapters, bases, prompt files and ``synthesize`` counts.

    Returns the number of prompts each teacher writes (``synthesize`` given once for all, or per adapter).
    """
    if models < 2:
        raise TransferError(f"fuse --method distill needs at least two adapters, got {models}")
    if bases not in (1, models):
        raise TransferError(f"--bases: {bases} base(s) for {models} adapters (give one for all, or one per adapter)")
    if prompts != models:
        raise TransferError(
            f"--prompts: {prompts} prompt file(s) for {models} adapters (one per adapter, in --models order)"
        )
    counts = [synthesize] * models if isinstance(synthesize, int) else list(synthesize)
    if len(counts) != models or any(c < 0 for c in counts):
        raise TransferError(f"--synthesize: give one count >= 0 for all adapters or one per adapter, got {counts}")
    return counts


__all__ = ["MultiDistiller", "Teacher", "check_teacher_counts"]
