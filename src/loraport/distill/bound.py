"""The side-effect bound: the keep term's weight rises while the student changes generic text too much.

A port should change its target elsewhere no more than the adapter changes its own base (its
generic-text perplexity change on the source, plus :data:`SIDE_EFFECT_MARGIN`). A fixed keep
weight cannot promise that: what an adapter costs elsewhere differs by orders of magnitude
(the json adapter raises SmolLM2's generic perplexity by 348 %, the capitals adapter by 9 %),
and one weight is either too weak for the small ones or needlessly strong for the large ones.

Measured on the instruction ports onto Gemma-3 (benchmarks/results/generation.md): at the keep
weight 0.5 the capitals port changed Gemma-3 by +19 % and the bullets port by +22 %, where
their adapters change SmolLM2 by +9 % and +12 %; at the weight 1 the bullets port stayed within
the bound (+12 %) with 96 % of its rate, while on the multiple-choice facts port the weight 1
took 160 steps and 456 s instead of 130 and 236 s for a change (+15 % instead of +25 %) its
bound (+50 %) did not ask for. So the weight starts where it was (``--distill-keep-weight``)
and doubles at a held-out check whenever the student's change on lines of generic text it
neither trains nor is reported on is over the bound; where the bound is loose nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .generic import mean_nll, watch_lines
from .teaching import digest

SIDE_EFFECT_MARGIN = 0.05  # the port may change generic perplexity this much more than the adapter does its source's
MAX_KEEP_SCALE = 16.0  # the keep weight rises at most to this many times its start
LOOSE_EVERY = 5  # while the change is under half the limit, it is measured at every 5th check only


@dataclass
class KeepBound:
    """The limit on the student's generic perplexity change, and the lines it is watched on.

    Attributes:
        rows: token rows of generic text apart from the keep and the reported lines.
        base_nll: the target base's mean NLL on ``rows``.
        limit: the largest perplexity change allowed (the adapter's own on its source, at least 0,
            plus :data:`SIDE_EFFECT_MARGIN`).
    """

    rows: Sequence[Sequence[int]]
    base_nll: float
    limit: float

    def change(self, student: Any, device: torch.device) -> float:
        """The student's perplexity change on the watched lines (``exp(nll - base_nll) - 1``)."""
        was_training = student.training
        student.eval()
        nll = mean_nll(student, self.rows, device)
        student.train(was_training)
        return math.exp(nll - self.base_nll) - 1

    def due(self, history: Sequence[Any]) -> bool:
        """Whether this check measures the change (``history``: the run's evaluations so far, this one last):
        every check while the last change measured is over half the limit, else every :data:`LOOSE_EVERY`-th.

        A measurement costs a forward pass over the whole vocabulary's head (2.5 s a check on Gemma-3's
        262k rows, 16 lines): on the Gemma-3 bins port, whose bound is loose (the adapter changes SmolLM2
        by +169,000 %), measuring every check took its 180 steps from 225 s to 274 s of training.
        """
        watched = [e for e in history[:-1] if e.generic_change is not None]
        if not watched or watched[-1].generic_change > self.limit / 2:
            return True
        checks_since = sum(1 for e in history[:-1] if e.step > watched[-1].step) + 1
        return checks_since >= LOOSE_EVERY

    def next_scale(self, change: float, scale: float) -> float:
        """The keep weight's factor after a check that measured ``change``: doubled while over the limit."""
        return min(scale * 2, MAX_KEEP_SCALE) if change > self.limit else scale


def adapter_limit(own_changes: Sequence[float | None]) -> float | None:
    """The bound for a port of adapters that change their sources' generic perplexity by ``own_changes``: the
    largest (at least 0) plus :data:`SIDE_EFFECT_MARGIN`; ``None`` when one of them is unknown."""
    if not own_changes or any(c is None for c in own_changes):
        return None
    return max(0.0, *[float(c) for c in own_changes if c is not None]) + SIDE_EFFECT_MARGIN


def adapter_change(generic: dict[str, Any]) -> float | None:
    """An adapter's own perplexity change on its source, from its teacher's ``generic`` record
    (:func:`~.teaching.run_teacher`); ``None`` when it was not measured."""
    if generic.get("base_nll") is None or generic.get("adapter_nll") is None:
        return None
    return float(torch.tensor(generic["adapter_nll"] - generic["base_nll"]).exp() - 1)


def watch_plan(
    options: Any, generic_text: str | None, own_changes: Sequence[float | None], keep_lines: list[str]
) -> tuple[list[str], list[str], float | None]:
    """``(keep lines, watched lines, limit)`` of a run: with ``--distill-keep-bound adapter`` and a keep term, the
    limit from the adapters' own changes (:func:`adapter_limit`) and lines to watch (:func:`~.generic.watch_lines`,
    which may take some of the keep lines); otherwise ``keep_lines``, none and ``None``."""
    limit = adapter_limit(own_changes) if options.keep_bound == "adapter" and options.keep_weight > 0 else None
    if limit is None:
        return keep_lines, [], None
    keep, watched = watch_lines(generic_text, options.generic_lines, options.seed)
    return keep, watched, limit


def start_bound(
    student: Any, rows: Sequence[Sequence[int]], limit: float | None, device: torch.device
) -> KeepBound | None:
    """The bound of a run (the target base's NLL on the watched ``rows``, the student's LoRA switched off);
    ``None`` without a limit or without lines to watch."""
    if limit is None or not rows:
        return None
    with student.disable_adapter():
        return KeepBound(rows, mean_nll(student, rows, device), limit)


def keep_key(options: Any, bound: KeepBound | None) -> dict[str, Any]:
    """What the keep term's vocabulary and the bound add to a run's cache key: nothing for a run without them,
    so such runs keep the keys (and checkpoints) they had."""
    key: dict[str, Any] = {}
    if options.keep_vocab != "support":
        key["keep_vocab"] = options.keep_vocab
    if bound is not None:
        key["bound"] = [digest([str(r) for r in bound.rows]), bound.limit]
    return key


def bound_info(bound: KeepBound | None, state: Any) -> dict[str, Any] | None:
    """What the bound did in a run (``state``: its :class:`~loraport.distill.train.TrainState`), for the report."""
    if bound is None:
        return None
    history = state.history
    raised = [e.step for e, before in zip(history[1:], history, strict=False) if e.keep_scale > before.keep_scale]
    changes = [e.generic_change for e in history if e.generic_change is not None]
    return {"limit": bound.limit, "watched_lines": len(bound.rows), "keep_scale": state.keep_scale,
            "raised_at_steps": raised, "changes": changes}  # fmt: skip


def bound_note(info: dict[str, Any], whose: str = "the adapter's own change") -> str:
    """The report's line on what the bound did (``info``: :func:`bound_info`'s; ``whose``: what the limit is)."""
    raised = info["raised_at_steps"]
    done = (
        f"the keep weight rose {info['keep_scale']:g}-fold (at steps {', '.join(map(str, raised))})"
        if raised
        else "the keep weight stayed as set"
    )
    return (
        f"distill: side-effect bound {info['limit']:+.1%} ({whose}, at least 0, + "
        f"{SIDE_EFFECT_MARGIN:.0%}), watched on {info['watched_lines']} other generic lines: {done}"
    )


__all__ = [
    "LOOSE_EVERY",
    "MAX_KEEP_SCALE",
    "SIDE_EFFECT_MARGIN",
    "KeepBound",
    "adapter_change",
    "adapter_limit",
    "bound_info",
    "bound_note",
    "keep_key",
    "start_bound",
    "watch_plan",
]
