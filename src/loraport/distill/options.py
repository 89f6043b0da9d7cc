"""The settings of ``--method distill``, declared once (flags, manifest keys and keywords derive from them)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from ..errors import LoraportError, TransferError
from ..option_fields import check_choices, keyword_fields, option

DISTILL = "distill"
LOSSES = ("seq+kl", "kl", "seq")
POSITIONS = ("auto", "answer", "all")
PRECISIONS = ("auto", "float32", "bfloat16", "mixed")
TOKEN_CHOICES = ("all", "effect")
LAYER_CHOICES = ("auto", "all", "upper")
LEARN_CHOICES = ("lora", "coefficients")
TASK_SHARES = ("even", "gap")
KEEP_BOUNDS = ("adapter", "off")
KEEP_VOCABS = ("support", "full")
# --distill-max-new-tokens auto: multiple-choice (ARC) prompts are answered in a few tokens on one line
# (8, cut at the first newline: the rows of benchmarks/results/real.md); every other prompt runs to the
# end of the teacher's turn, capped here (see benchmarks/results/generation.md for where teachers stop).
AUTO_MC_TOKENS = 8
AUTO_OPEN_TOKENS = 256
SYNTH_FILTERS = ("effect", "template")
SYNTH_WRITERS = ("base", "teacher")
DEFAULT_MAX_STEPS = 600


def _tokens_word(word: Any) -> int | str:
    """``--distill-max-new-tokens``: ``auto`` or a positive count."""
    if word == "auto" or isinstance(word, int):
        return word
    try:
        return int(word)
    except (TypeError, ValueError):
        raise LoraportError(f"--distill-max-new-tokens must be 'auto' or a number, got {word!r}") from None


def _stops_word(word: Any) -> list[str] | None:
    """``--distill-stop``: a JSON list of strings, or one string with ``\\n`` / ``\\t`` escapes."""
    if word is None or isinstance(word, list):
        return word
    text = str(word)
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoraportError(f"--distill-stop: not a JSON list of strings ({exc.msg})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise LoraportError("--distill-stop: expected a JSON list of non-empty strings")
        return value
    return [text.replace("\\n", "\n").replace("\\t", "\t")]


@dataclass
class DistillOptions:
    """Settings of ``method="distill"`` (see :mod:`loraport.distill`).

    The unlabeled generic text (``--calibration``) and the start point (``--init``) are shared
    with ``calibrated`` and read from :class:`~loraport.calibrate.CalibrationOptions`.

    Attributes:
        prompts: the task's inputs (a file or a list of strings): JSONL with a ``prompt`` field
            (used verbatim), ARC JSONL (``question`` through the evaluator's template; answers
            ignored) or plain text, one prompt a line.
        synthesize: the teacher writes this many new prompts in the style of the given ones.
        synth_writer: who writes them: the source ``base`` (default) or the ``teacher`` (measured: the
            real benchmark's bins LoRA, trained on answers only, made SmolLM2 write 0 prompts of the
            seeds' shape in 60 tries; SmolLM2 without it wrote 20 of 24, 4 duplicates).
        synth_filter: which synthetic prompts are kept: ``template`` (the shape the given prompts
            share, deduplicated) or ``effect`` (of those, the ones where the adapter changes the
            teacher's answer most).
        rank: the student LoRA's rank (default: the adapter's largest).
        steps: the most training steps (``None``: until held-out agreement stops improving,
            at most :data:`DEFAULT_MAX_STEPS`); ``time``: the most training seconds.
        loss: ``seq+kl`` (the student's likelihood of the teacher's continuation plus the KL to
            the teacher's next-token distribution at aligned positions), ``kl`` or ``seq``.
        positions: where the KL is taken: ``answer`` (from the end of the prompt on), ``all`` aligned
            positions, or ``auto`` (default): ``all`` with one tokenizer, ``answer`` across tokenizers.
        lr / batch_size / warmup: AdamW on the LoRA factors, constant after a linear warm-up.
        heldout: the share of the prompts held out to choose between the start port and the
            distilled adapter (and to stop training).
        max_new_tokens: the longest teacher continuation in tokens; ``auto`` (default): 8 for multiple-choice
            (ARC) prompts, else 256. A continuation also ends at the teacher's end token (EOS, or the
            chat template's end of turn: the student learns to end there too) or a stop string.
        stops: stop strings (default: a newline for ARC prompts, none otherwise).
        samples / temperature: this many sampled continuations per prompt besides the greedy one
            (distinct, seeded), at this temperature.
        chat: plain prompts become the user's turn of a conversation; conversations (``messages``
            prompts, or these) reach the teacher through the source's chat template and the
            student through the target's.
        source_chat_template / target_chat_template: a Jinja template file (or a built-in name:
            ``gemma``, ``chatml``) for a base whose tokenizer has none, or to override it.
        layers: ``all`` adapted layers of the target get the student's LoRA, or the ``upper`` half only
            (the backward pass then stops half-way down); ``auto`` (default): ``upper`` when the student
            starts from the bare target (no start port or merge: every cross-family port) and the target
            has at least 12 layers, else ``all`` (a start port's lower layers are kept; the upper half of
            the zoo's 6-layer X learned less). Measured on the Gemma-3 facts and bins ports: upper
            scored 0.920 / 0.938 against 0.905 / 0.781 with all, in 276 / 299 s against 328 / 263 s, at
            +25 % / +17 % generic perplexity against +54 % / +46 % (benchmarks/results/real.md).
        learn: what the student learns: ``lora`` (a LoRA of its own), or ``coefficients`` (fuse only, adapters
            of the target's base: one weight per adapter and layer over the adapters' own factors,
            :mod:`~loraport.distill.coefficients`).
        task_shares: how a fusion's batch is split over its teachers: ``even``, or ``gap`` (after each
            held-out check, in proportion to how far the student is from each teacher: 1 minus the mean
            of its held-out and probe agreement; each task keeps at least half its even share).
        tokens: token selection: ``all`` (default) or ``effect`` (train on the continuation
            targets where the adapter raises the next token's log-probability over the source
            base most, a ``token_share`` of them: TiTok).
        force: write the port even when the checks say it learned nothing (the teacher ended at
            once on most prompts, or held-out agreement did not rise from a bare-target start).
        top_k: teacher probabilities kept per position (the rest is one tail bucket).
        eval_every / patience: held-out evaluation every ``eval_every`` steps; training stops
            after ``patience`` evaluations without improvement.
        keep_weight: weight of keeping the target's own predictions on generic text (``--calibration``
            lines, else standard-library docstrings; lines apart from those the perplexity is measured on).
        keep_bound: ``adapter`` (default): at every held-out check the student's generic perplexity change
            is measured on lines of their own, and the keep weight doubles (up to 16 times) while that change
            is over the adapter's own on its source (at least 0) plus 5 points
            (:mod:`~loraport.distill.bound`); ``off``: the weight stays ``keep_weight``.
        keep_vocab: the keep term's distributions over the ``support`` (default; across tokenizers the
            tokens both spell alike) or the target's ``full`` vocabulary.
        generic_lines: lines of generic text the perplexity change is measured on.
        seed: data order, held-out split, synthesis and LoRA initialisation.
        cache: teacher outputs and training checkpoints (default ``~/.cache/loraport/distill``);
            a killed run resumes from its last checkpoint.
        precision: the student's arithmetic: ``auto`` (``bfloat16`` on CUDA and on CPUs with bfloat16
            instructions, else ``float32``), ``float32``, ``bfloat16`` (the frozen base weights held in
            bfloat16, steps under bfloat16 autocast; the LoRA factors float32), ``mixed`` (float32 base
            weights under bfloat16 autocast: more memory, the earlier default).
    """

    TITLE: ClassVar[str] = "distillation (--method distill)"

    prompts: str | os.PathLike[str] | Sequence[str] | None = option(
        None,
        name="prompts",
        flag="prompts",
        metavar="FILE",
        help="the task's inputs, no labels: JSONL with a 'prompt' field, ARC JSONL (its questions) or plain text, "
        "one prompt per line",
    )
    synthesize: int = option(
        0,
        name="synthesize",
        flag="synthesize",
        word=int,
        metavar="N",
        help="the teacher writes N more prompts in the style of the given ones (a handful of examples is enough)",
    )
    synth_filter: str = option(
        "template",
        name="distill_synth_filter",
        flag="distill_synth_filter",
        choices=SYNTH_FILTERS,
        help="synthetic prompts kept: the given prompts' shape (template, default) or, of those, where the "
        "adapter changes the answer most (effect)",
    )
    synth_writer: str = option(
        "base",
        name="distill_synth_writer",
        flag="distill_synth_writer",
        choices=SYNTH_WRITERS,
        help="who writes the synthetic prompts: the source base (default; an adapter trained on answers only can "
        "lose the skill) or the teacher",
    )
    rank: int | None = option(
        None,
        name="distill_rank",
        flag="distill_rank",
        word=int,
        metavar="R",
        help="rank of the distilled LoRA (default: the adapter's)",
    )
    steps: int | None = option(
        None,
        name="distill_steps",
        flag="distill_steps",
        word=int,
        metavar="N",
        help=f"at most N training steps (default: until held-out agreement stops improving, at most "
        f"{DEFAULT_MAX_STEPS})",
    )
    time: float | None = option(
        None, name="distill_time", flag="distill_time", word=float, metavar="SECONDS", help="at most this long training"
    )
    loss: str = option(
        "seq+kl",
        name="distill_loss",
        flag="distill_loss",
        choices=LOSSES,
        help="seq+kl (default): likelihood of the teacher's continuation plus KL to its next-token distribution; "
        "kl; seq",
    )
    positions: str = option(
        "auto",
        name="distill_positions",
        flag="distill_positions",
        choices=POSITIONS,
        help="where the KL is taken: answer (from the end of the prompt on), all aligned positions, or auto "
        "(default: all with one tokenizer, answer across tokenizers)",
    )
    lr: float = option(2e-3, name="distill_lr", flag="distill_lr", word=float, metavar="LR", help="learning rate")
    batch_size: int = option(
        16, name="distill_batch_size", flag="distill_batch_size", word=int, metavar="B", help="prompts per step"
    )
    warmup: int = option(5, name="distill_warmup")
    heldout: float = option(
        0.1,
        name="distill_heldout",
        flag="distill_heldout",
        word=float,
        metavar="FRACTION",
        help="share of the prompts held out to choose the better of the start port and the distilled adapter",
    )
    max_new_tokens: int | str = option(
        "auto",
        name="distill_max_new_tokens",
        flag="distill_max_new_tokens",
        convert=_tokens_word,
        metavar="T",
        help=f"longest teacher continuation in tokens (default auto: {AUTO_MC_TOKENS} for multiple-choice prompts, "
        f"else {AUTO_OPEN_TOKENS}); it also ends at the teacher's end of turn or a stop string",
    )
    stops: list[str] | None = option(
        None,
        name="distill_stop",
        flag="distill_stop",
        convert=_stops_word,
        metavar="TEXT",
        help="end the teacher's continuation at this text ('\\n' for a newline; a JSON list for several; default: "
        "a newline for multiple-choice prompts, none otherwise)",
    )
    samples: int = option(
        0,
        name="distill_samples",
        flag="distill_samples",
        word=int,
        metavar="K",
        help="K sampled teacher continuations per prompt besides the greedy one (default 0)",
    )
    temperature: float = option(
        1.0,
        name="distill_temperature",
        flag="distill_temperature",
        word=float,
        metavar="T",
        help="sampling temperature of --distill-samples (default 1.0, top-p 0.95)",
    )
    chat: bool = option(
        False,
        name="chat",
        flag="chat",
        switch=True,
        help="plain prompts are the user's turn of a conversation: each model reads it through its chat template",
    )
    source_chat_template: str | None = option(
        None,
        name="source_chat_template",
        flag="source_chat_template",
        metavar="FILE",
        help="Jinja chat template for the source base (or a built-in: gemma, chatml)",
    )
    target_chat_template: str | None = option(
        None,
        name="target_chat_template",
        flag="target_chat_template",
        metavar="FILE",
        help="Jinja chat template for the target base (or a built-in: gemma, chatml)",
    )
    layers: str = option(
        "auto",
        name="distill_layers",
        flag="distill_layers",
        choices=LAYER_CHOICES,
        help="where the student's LoRA goes: auto (default: upper when the student starts from the bare target "
        "and it has 12 layers or more, else all), all the adapted layers, or upper: the upper half of the "
        "target's layers (the backward pass stops there: faster steps)",
    )
    learn: str = option(
        "lora",
        name="distill_learn",
        flag="distill_learn",
        choices=LEARN_CHOICES,
        help="what the student learns: lora (default), or coefficients (fuse only, adapters of the target's base: "
        "one weight per adapter and layer over the adapters' own factors, AdaMerging style)",
    )
    task_shares: str = option(
        "even",
        name="distill_task_shares",
        flag="distill_task_shares",
        choices=TASK_SHARES,
        help="fuse only: how each step's batch is split over the teachers: even (default), or gap: in proportion "
        "to how far the student is from each teacher at the last held-out check",
    )
    tokens: str = option(
        "all",
        name="distill_tokens",
        flag="distill_tokens",
        choices=TOKEN_CHOICES,
        help="continuation targets learned: all (default), or effect: where the adapter changes the source's "
        "prediction most (TiTok)",
    )
    token_share: float = option(
        0.5,
        name="distill_token_share",
        flag="distill_token_share",
        word=float,
        metavar="SHARE",
        help="--distill-tokens effect: the share of continuation targets kept (default 0.5)",
    )
    force: bool = option(
        False,
        name="distill_force",
        flag="distill_force",
        switch=True,
        help="write the port even when it learned nothing (the teacher ended at once, or agreement did not rise)",
    )
    top_k: int = option(64, name="distill_top_k")
    eval_every: int = option(10, name="distill_eval_every")
    patience: int = option(
        4,
        name="distill_patience",
        flag="distill_patience",
        word=int,
        metavar="N",
        help="stop after N held-out checks without progress (default 4; a larger N trains longer, e.g. for "
        "memorised facts, which held-out prompts cannot show)",
    )
    keep_weight: float = option(
        0.5,
        name="distill_keep_weight",
        flag="distill_keep_weight",
        word=float,
        metavar="W",
        help="weight of keeping the target's own predictions on generic text (--calibration, else standard-library "
        "docstrings; default 0.5; 0: off)",
    )
    keep_bound: str = option(
        "adapter",
        name="distill_keep_bound",
        flag="distill_keep_bound",
        choices=KEEP_BOUNDS,
        help="adapter (default): double the keep weight at a held-out check while the student changes the "
        "target's generic perplexity more than the adapter changes its source's (+5 points); off: a fixed weight",
    )
    keep_vocab: str = option(
        "support",
        name="distill_keep_vocab",
        flag="distill_keep_vocab",
        choices=KEEP_VOCABS,
        help="the keep term's distributions: over the support the teacher's are on (support, default) or the "
        "target's whole vocabulary (full)",
    )
    generic_lines: int = option(32, name="distill_generic_lines")
    seed: int = option(0, name="distill_seed", flag="distill_seed", word=int, metavar="S", help="random seed")
    cache: str | None = option(
        None,
        name="distill_cache",
        flag="distill_cache",
        metavar="DIR",
        help="teacher outputs and checkpoints (default ~/.cache/loraport/distill); a killed run resumes from here",
    )
    precision: str = option(
        "auto",
        name="distill_precision",
        flag="distill_precision",
        choices=PRECISIONS,
        help="the student's arithmetic: auto (bfloat16 on CUDA and on CPUs with bfloat16 instructions, else "
        "float32), float32, bfloat16 (base weights and steps in bfloat16, LoRA factors float32), mixed (float32 "
        "base weights under bfloat16 autocast)",
    )

    def validate(self) -> None:
        """Check every field (raises ``TransferError``); reads the prompts once to fail early."""
        from .prompts import read_prompts

        if self.prompts is None:
            raise TransferError(
                "--method distill needs --prompts FILE (the task's inputs without answers: JSONL with 'prompt', "
                "ARC JSONL, or one prompt per line)"
            )
        check_choices(self)
        checks = [
            (self.synthesize >= 0, f"--synthesize must be >= 0, got {self.synthesize}"),
            (self.rank is None or self.rank >= 1, f"--distill-rank must be >= 1, got {self.rank}"),
            (self.steps is None or self.steps >= 1, f"--distill-steps must be >= 1, got {self.steps}"),
            (self.time is None or self.time > 0, f"--distill-time must be > 0 seconds, got {self.time}"),
            (self.lr > 0, f"--distill-lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"--distill-batch-size must be >= 1, got {self.batch_size}"),
            (0 < self.heldout < 1, f"--distill-heldout must be in (0, 1), got {self.heldout}"),
            (
                self.max_new_tokens == "auto" or (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1),
                f"--distill-max-new-tokens must be 'auto' or >= 1, got {self.max_new_tokens!r}",
            ),
            (self.samples >= 0, f"--distill-samples must be >= 0, got {self.samples}"),
            (self.temperature > 0, f"--distill-temperature must be > 0, got {self.temperature}"),
            (0 < self.token_share <= 1, f"--distill-token-share must be in (0, 1], got {self.token_share}"),
            (self.patience >= 1, f"--distill-patience must be >= 1, got {self.patience}"),
            (self.top_k >= 1 and self.eval_every >= 1, "top_k and eval_every must be >= 1"),
            (self.keep_weight >= 0, f"--distill-keep-weight must be >= 0, got {self.keep_weight}"),
            (self.warmup >= 0 and self.generic_lines >= 0, "warmup and generic_lines must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise TransferError(message)
        if self.cache is not None and Path(self.cache).exists() and not Path(self.cache).is_dir():
            raise TransferError(f"--distill-cache {self.cache}: is a file; it must name a directory (made if missing)")
        self.max_new_tokens = _tokens_word(self.max_new_tokens)
        self.stops = _stops_word(self.stops)
        given = read_prompts(self.prompts)
        if self.synthesize and given.kind == "messages":
            raise TransferError("--synthesize needs plain prompts (with --chat to make them conversations), not "
                                "'messages' lines")  # fmt: skip

    def resolved_generation(self, kind: str) -> tuple[int, list[str]]:
        """``(max_new_tokens, stop strings)`` for prompts of ``kind`` (``auto``: by the kind)."""
        multiple_choice = kind == "arc" and not self.chat
        tokens = self.max_new_tokens
        if tokens == "auto":
            tokens = AUTO_MC_TOKENS if multiple_choice else AUTO_OPEN_TOKENS
        stops = self.stops if self.stops is not None else (["\n"] if multiple_choice else [])
        return int(tokens), list(stops)


# ``transfer()`` keyword names -> DistillOptions fields.
DISTILL_FIELDS: dict[str, str] = keyword_fields(DistillOptions)


def distill_summary(options: DistillOptions) -> dict[str, Any]:
    """The options as report fields (the prompts by name only)."""
    values = {f.name: getattr(options, f.name) for f in fields(options)}
    prompts = values.pop("prompts")
    values["prompts"] = (
        str(prompts) if isinstance(prompts, str | os.PathLike) else f"<list of {len(list(prompts or []))} strings>"
    )
    return values


__all__ = [
    "AUTO_MC_TOKENS",
    "AUTO_OPEN_TOKENS",
    "DEFAULT_MAX_STEPS",
    "DISTILL",
    "DISTILL_FIELDS",
    "KEEP_BOUNDS",
    "KEEP_VOCABS",
    "LAYER_CHOICES",
    "LEARN_CHOICES",
    "LOSSES",
    "POSITIONS",
    "PRECISIONS",
    "SYNTH_FILTERS",
    "SYNTH_WRITERS",
    "TASK_SHARES",
    "TOKEN_CHOICES",
    "DistillOptions",
    "distill_summary",
]
